"""U-Net with dropout between the two convolutions of every contracting block (knee thesis)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers import Conv, Pool
from torch import nn

__all__ = ["EncoderDropoutUNet"]


def _block(spatial_dims: int, cin: int, cout: int, dropout: float) -> nn.Sequential:
    """conv 3 -> dropout -> ReLU -> conv 3 -> ReLU: MONAI's ``Convolution`` (``adn_ordering`` "NDA")
    drops before its activation; the same function as Keras's conv -> ReLU -> Dropout, since
    dropout scales each value by 0 or 1 / (1 - p) and ReLU(c x) = c ReLU(x) for c >= 0."""
    return nn.Sequential(
        Convolution(spatial_dims, cin, cout, kernel_size=3, act="relu", norm=None, dropout=dropout or None),
        Convolution(spatial_dims, cout, cout, kernel_size=3, act="relu", norm=None),
    )


class EncoderDropoutUNet(nn.Module):
    """The U-Net of the knee bone thesis (sec. 4.4): the original U-Net (Ronneberger et al., MICCAI
    2015; double 3x3(x3) convolution with ReLU per level, max-pool down, channels doubling, 2x2(x2)
    transposed-convolution up, concatenation skips, 1x1(x1) output) in 2D or 3D, with dropout
    ``dropout`` between the two convolutions of every contracting block including the bottom one,
    and none on the expanding side (sec. 4.4.3: "Placing a Dropout unit between each convolution
    pair on the contracting side ... 0.2 achieved the best results"). A contracting block is
    conv -> dropout -> ReLU -> conv -> ReLU (MONAI's ``Convolution`` drops before its activation),
    which computes the same as the usual Keras order conv -> ReLU -> Dropout: dropout multiplies
    each value by 0 or 1 / (1 - p), and ReLU(c x) = c ReLU(x) for c >= 0.

    The thesis names neither widths nor depth ("Channels: growth and initial size" is a heading
    without text) nor normalisation nor initialisation. The defaults: the original U-Net's four
    poolings at a quarter of its widths (16 ... 256), no batch norm (Keras U-Nets of the time had
    none), and its initialisation (Gaussian weights, standard deviation sqrt(2 / fan-in); zero
    biases), except that the output layer starts every map at probability ``out_prior`` (1 %;
    None: as the rest), because soft Dice on sigmoid maps that start at 0.5 everywhere locked
    small bones' maps at all-positive, where their gradient vanishes, on our synthetic knees. The
    36 thick coronal slices halve twice (36 -> 18 -> 9), so ``strides`` pools the slice axis only
    at the first two levels; each stride is per axis.

    Input (B, in_channels, *spatial) with each spatial size divisible by the product of the
    strides along it (224 x 224 x 36 with the defaults); output (B, out_channels, *spatial) logits:
    one sigmoid map per bone, or one for all bones merged.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 3,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[Sequence[int] | int] = ((2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1)),
        dropout: float = 0.2,
        out_prior: float | None = 0.01,
    ) -> None:
        super().__init__()
        fea = [int(f) for f in features]
        steps = [
            tuple([int(s)] * spatial_dims) if isinstance(s, int) else tuple(int(v) for v in s)
            for s in strides
        ]
        if len(steps) != len(fea) - 1 or any(len(s) != spatial_dims for s in steps):
            raise ValueError(
                f"strides must give {len(fea) - 1} poolings of {spatial_dims} values for features {fea}, got {list(strides)}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.strides = steps
        self.downs = nn.ModuleList(
            [_block(spatial_dims, in_channels, fea[0], dropout)]
            + [_block(spatial_dims, a, b, dropout) for a, b in zip(fea[:-1], fea[1:], strict=True)]
        )
        self.pools = nn.ModuleList([Pool["max", spatial_dims](kernel_size=s, stride=s) for s in steps])
        self.ups = nn.ModuleList(
            [
                UpSample(spatial_dims, b, a, scale_factor=s, mode="deconv")
                for a, b, s in zip(fea[:-1], fea[1:], steps, strict=True)
            ]
        )
        self.decoders = nn.ModuleList([_block(spatial_dims, 2 * a, a, 0.0) for a in fea[:-1]])
        self.out = Conv["conv", spatial_dims](fea[0], out_channels, kernel_size=1)
        for m in self.modules():  # the U-Net paper's Gaussian, std sqrt(2 / fan-in) (sec. 3)
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if out_prior is not None:  # every map starts at out_prior everywhere (Lin et al., ICCV 2017)
            if not 0.0 < float(out_prior) < 1.0:
                raise ValueError(f"out_prior must be a probability in (0, 1), got {out_prior}")
            nn.init.normal_(self.out.weight, std=0.01)
            nn.init.constant_(self.out.bias, math.log(out_prior / (1.0 - out_prior)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        need = [int(torch.tensor([s[d] for s in self.strides]).prod()) for d in range(len(self.strides[0]))]
        if any(n % k for n, k in zip(x.shape[2:], need, strict=True)):
            raise ValueError(
                f"EncoderDropoutUNet: spatial size {tuple(x.shape[2:])} is not divisible by {tuple(need)} "
                "(the product of the strides per axis); resize or pad to a multiple"
            )
        skips = []
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else self.pools[i - 1](x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(reversed(self.ups), reversed(self.decoders), strict=True):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.out(x)
