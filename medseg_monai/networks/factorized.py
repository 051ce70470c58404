"""The U-Net of the LV study (Avetisian, "Volumetric medical image segmentation with deep
convolutional neural networks"): each 3D convolution factorised into four 2D convolutions along
different axes; plus the optimizer parameter groups for its L2 on convolution weights only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["FACTORIZED_KERNELS", "FactorizedConvUNet", "weight_decay_groups"]

CONVS = ("factorized", "full")
NORMS = (None, "batch")

# The four 2D kernels of a factorised block, in order, over the spatial axes (S1, S2, S3) of a
# (B, C, S1, S2, S3) tensor. The paper's text says only "four 2D convolutions along different axis"
# (its figure 2 is not in the text); our reading is in FactorizedConvUNet's docstring.
FACTORIZED_KERNELS: tuple[tuple[int, int, int], ...] = ((3, 3, 1), (3, 1, 3), (1, 3, 3), (3, 3, 1))


class _ConvNormReluDrop(nn.Sequential):
    """One convolution (zero padding, size kept), optional batch norm, ReLU, dropout."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], norm: str | None, dropout: float) -> None:
        kernel = tuple(int(k) for k in kernel)
        layers: list[nn.Module] = [
            # a bias before batch norm would get no gradient (the norm removes the mean)
            nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=norm is None)
        ]
        if norm == "batch":
            layers.append(nn.BatchNorm3d(cout))
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        super().__init__(*layers)


class _Block(nn.Sequential):
    """A convolutional block: the factorised one (one convolution per kernel of ``kernels``, the
    first from ``cin`` to ``cout`` channels, the others ``cout`` to ``cout``) or, for the ``full``
    ablation, a single 3x3x3 convolution; each convolution followed by ReLU and dropout."""

    def __init__(
        self,
        cin: int,
        cout: int,
        conv: str,
        kernels: Sequence[Sequence[int]],
        norm: str | None,
        dropout: float,
    ) -> None:
        ks = list(kernels) if conv == "factorized" else [(3, 3, 3)]
        super().__init__(
            *(_ConvNormReluDrop(cin if i == 0 else cout, cout, k, norm, dropout) for i, k in enumerate(ks))
        )


class FactorizedConvUNet(nn.Module):
    """U-Net with factorised 3D convolutions, after Avetisian, "Volumetric medical image
    segmentation with deep convolutional neural networks" (Lomonosov Moscow State University;
    sec. 2.1 Architecture, figs. 1-2, table 1; the paper numbers its sections 2.1, 2.1, 2.2, 2.1,
    cited here as 2.1 for the architecture and 2.2 for the implementation details), the network
    of the LV study.

    - Block: "four 2D convolutions along different axis ... Each convolution is followed by ReLU
      nonlinearity and a dropout" (sec. 2.1). A volume has three coordinate planes, so one of the
      four is used twice. The paper's figure 2, which would show the axes and their order, is an
      image absent from the text we have, so the default ``kernels`` (``FACTORIZED_KERNELS``) is
      our reading, not the paper's statement: 3x3x1 (the S1-S2 plane), 3x1x3 (S1-S3), 1x3x3
      (S2-S3), 3x3x1 again, for a (B, C, S1, S2, S3) input. With volumes loaded as MONAI does,
      (C, X, Y, Z) with Z the slice axis of a short-axis stack, the repeated plane is the in-plane
      one (fine resolution, 192 or 256 pixels) and each through-plane kernel spans 3 of the 10-15
      slices. For a (B, C, D, H, W) layout with D the slice axis pass
      ``kernels=((1, 3, 3), (3, 1, 3), (3, 3, 1), (1, 3, 3))``. The block's receptive field is
      7 x 7 x 5 (in-plane, in-plane, slices) against 3 x 3 x 3 for one 3x3x3 convolution.
    - Weights: the paper compares "single 3x3x3 convolution has 27 parameters, while 4 3x3
      convolutions have only 36 parameters" (sec. 2.1): per input-output channel pair, 4 x 9 = 36
      weights in a factorised block against 27 in one 3x3x3 convolution (more weights, not
      fewer, despite the paper's "only"; the ``full`` switch gives the 27 for comparison).
    - Contracting path: a block of ``features`` channels (30, table 1) at full size, then
      ``depth`` times a 2x2x2 max-pool and a block doubling the channels (30, 60, 120, 240).
      ``depth`` = 3 as the paper: it needs sizes "with dimensions 2^3 * n" (sec. 2.2).
    - Expanding path: an up-convolution "has 1x1 kernel which upscales the data, after which we
      concatenate upscaled data with output of convolution block with same size" (sec. 2.1): a
      transposed convolution with kernel 1, stride 2 (a TensorFlow "same" transposed convolution
      doubling the size: values at even positions, the bias elsewhere), halving the channels as in
      U-Net (the paper does not give the widths), concatenated with the skip (skip first), then a
      block back to the skip's width.
    - Output: dropout "right before output layer" (sec. 2.2), then a 1x1x1 convolution to
      ``out_channels`` logits (the paper applies a softmax in the loss).
    - No batch norm: "using batch normalization is not beneficial in our case and leads to
      numerical instabilities" (Hyperparameters, numbered 2.1 again); ``norm="batch"`` adds it
      after every convolution of the blocks (before the ReLU, convolution biases then dropped) for
      that ablation.
    - ``dropout``: the drop rate of every dropout, 1 - keep probability 0.85 (table 1); element-wise
      as TensorFlow's ``tf.nn.dropout``.

    Input (B, in_channels, S1, S2, S3) with every spatial size a multiple of ``2 ** depth`` (8 by
    default); other sizes are refused with a one-line ``ValueError`` naming the size and the
    multiple, rather than padded or cropped here: the bundle pads with MONAI's ``DivisiblePad``
    before the network (and crops the prediction back), so a size that reaches the network
    unpadded is a configuration error. Output (B, out_channels, S1, S2, S3) logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 30,
        depth: int = 3,
        dropout: float = 0.15,
        norm: str | None = None,
        conv: str = "factorized",
        kernels: Sequence[Sequence[int]] = FACTORIZED_KERNELS,
    ) -> None:
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {', '.join(CONVS)}, got {conv!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be None or 'batch', got {norm!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is a drop rate in [0, 1), got {dropout}")
        ks = tuple(tuple(int(k) for k in kernel) for kernel in kernels)
        if conv == "factorized" and (len(ks) != 4 or any(len(k) != 3 or sorted(k) != [1, 3, 3] for k in ks)):
            raise ValueError(f"kernels must be four 2D 3x3 kernels over 3 axes such as (3, 3, 1), got {ks}")
        self.divisor = 2**depth
        widths = [int(features) * 2**i for i in range(depth + 1)]

        def block(cin: int, cout: int) -> _Block:
            return _Block(cin, cout, conv, ks, norm, dropout)

        self.stem = block(in_channels, widths[0])
        self.pool = nn.MaxPool3d(2)
        self.downs = nn.ModuleList(block(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        pairs = list(zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True))
        self.upconvs = nn.ModuleList(
            nn.ConvTranspose3d(w, f, kernel_size=1, stride=2, output_padding=1) for w, f in pairs
        )
        self.ups = nn.ModuleList(block(2 * f, f) for _, f in pairs)
        self.out_dropout = nn.Dropout(dropout)
        self.out = nn.Conv3d(widths[0], out_channels, kernel_size=1)
        # He-normal weights, zero biases: the paper gives no initialisation, and with about 30
        # ReLU convolutions, dropout after each and no normalisation, PyTorch's default (variance
        # 1/(3 fan-in)) left the synthetic hearts' quick runs barely learning in a few hundred steps
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"FactorizedConvUNet takes (B, C, S1, S2, S3) input, got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(s % self.divisor for s in size):
            raise ValueError(
                f"FactorizedConvUNet: spatial size {size} is not a multiple of {self.divisor} (2 ** depth); pad it first, e.g. MONAI's DivisiblePad(k={self.divisor})"
            )
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for upconv, up in zip(self.upconvs, self.ups, strict=True):
            y = up(torch.cat([skips.pop(), upconv(y)], dim=1))
        return self.out(self.out_dropout(y))


def weight_decay_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups for L2 on convolution weights only, as the paper ("l2
    regularization of convolutional filters' weights", sec. 2.2; weight 3e-4, table 1):
    the weights of every convolution (transposed ones included) get ``weight_decay``, every other
    parameter (biases, norm scales and shifts) 0.

    ``torch.optim.Adam(weight_decay_groups(net, 3e-4), lr=7.6e-5, betas=(0.9, 0.999))``. Adam's
    ``weight_decay`` adds ``weight_decay * w`` to the gradient, the gradient of TensorFlow's
    ``weight_decay * tf.nn.l2_loss(w)`` (= sum w**2 / 2) added to the loss. Empty groups are left
    out; each parameter appears once even if shared.
    """
    decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in net.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            decay.append(m.weight)
    rest: Iterable[nn.Parameter] = (p for p in net.parameters() if id(p) not in seen)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": list(rest), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
