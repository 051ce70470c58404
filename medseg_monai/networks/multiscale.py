"""The 3D U-Net variant of Kayalibay et al. (2017): strided convolutions, PReLU, and segmentation
maps from several decoder scales upsampled and summed into the output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, Norm
from torch import nn

__all__ = ["MultiScaleMapUNet"]

SKIPS = ("concat", "sum", "none")


class _NormAct(nn.Sequential):
    """Batch norm then PReLU (one slope per channel): every activation of the network."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__(Norm[Norm.BATCH, spatial_dims](channels), nn.PReLU(channels))


class _ConvNormAct(nn.Sequential):
    def __init__(self, spatial_dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        conv = Conv[Conv.CONV, spatial_dims](cin, cout, kernel, stride=stride, padding=kernel // 2)
        super().__init__(conv, _NormAct(spatial_dims, cout))


class _Down(nn.Module):
    """A contracting level: a strided 3x3x3 convolution halves the size, a second convolution
    follows; with ``residual`` the strided output is added to the second convolution's before its
    norm (the authors' code, ``fcn_rffc4``)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, residual: bool) -> None:
        super().__init__()
        self.down = _ConvNormAct(spatial_dims, cin, cout, stride=2)
        self.conv = Conv[Conv.CONV, spatial_dims](cout, cout, 3, padding=1)
        self.norm_act = _NormAct(spatial_dims, cout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        y = self.conv(d)
        return self.norm_act(y + d if self.residual else y)


class _Up(nn.Module):
    """An expanding level: a 1x1x1 convolution reduces the channels (to half), a 3x3x3 transposed
    convolution doubles the size, the encoder's features join (concatenated, summed or not at all)
    and a 3x3x3 convolution gives ``2 * cout`` channels."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, skip: str) -> None:
        super().__init__()
        self.reduce = _ConvNormAct(spatial_dims, cin, cin // 2, kernel=1)
        self.up = nn.Sequential(
            Conv[Conv.CONVTRANS, spatial_dims](cin // 2, cout, 3, stride=2, padding=1, output_padding=1),
            _NormAct(spatial_dims, cout),
        )
        self.skip = skip
        self.conv = _ConvNormAct(spatial_dims, 2 * cout if skip == "concat" else cout, 2 * cout)

    def forward(self, x: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        u = self.up(self.reduce(x))
        if self.skip == "concat":
            u = torch.cat([encoder, u], dim=1)
        elif self.skip == "sum":
            u = u + encoder
        return self.conv(u)


def _check_divisible(x: torch.Tensor, divisor: int) -> None:
    if any(s % divisor for s in x.shape[2:]):
        raise ValueError(f"spatial sizes must be divisible by {divisor}, got {tuple(x.shape[2:])}")


class MultiScaleMapUNet(nn.Module):
    """U-Net of Kayalibay et al., "CNN-based segmentation of medical imaging data" (arXiv:1701.03056,
    2017), as their BraTS network ``fcn_rffc4`` builds it.

    - 3x3x3 convolutions with zero padding everywhere but the 1x1x1 ones that make segmentation
      maps and that halve the channels before each transposed convolution;
    - strided convolutions instead of pooling; batch norm before every PReLU;
    - contracting levels of ``features`` channels (default 8, 16, 32, 64: a first full-size
      convolution, then one level per further width, each half the size of the one before);
    - expanding levels: 1x1x1 reduction, 3x3x3 transposed convolution (stride 2), the long skip,
      a 3x3x3 convolution;
    - a 1x1x1 segmentation map from each of the ``n_maps`` finest decoder scales; from the coarsest
      down, each is upsampled by linear interpolation and added to the next finer one, giving the
      output.

    Switches for the paper's ablations: ``skip`` ``concat`` (the paper), ``sum`` (element-wise
    summation) or ``none`` (no long skips); ``n_maps`` 1 (a single output map) to the number of
    levels; ``residual`` (the authors' code adds each strided convolution's output to the level's
    second convolution; not in the paper's text).

    Input (B, in_channels, *spatial), each spatial size divisible by 2 ** (len(features) - 1)
    (8 by default: 160 x 144 x 128 as the paper's crop); output (B, out_channels, *spatial) logits
    (the paper applies a softmax).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 5,
        features: Sequence[int] = (8, 16, 32, 64),
        n_maps: int = 3,
        skip: str = "concat",
        residual: bool = True,
    ) -> None:
        super().__init__()
        fea = tuple(int(f) for f in features)
        if len(fea) < 2:
            raise ValueError(f"features must give at least 2 widths, got {fea}")
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {', '.join(SKIPS)}, got {skip!r}")
        if not 1 <= n_maps <= len(fea) - 1:
            raise ValueError(f"n_maps must be from 1 to {len(fea) - 1} (the decoder scales), got {n_maps}")
        self.divisor = 2 ** (len(fea) - 1)
        self.stem = _ConvNormAct(spatial_dims, in_channels, fea[0])
        self.downs = nn.ModuleList(
            _Down(spatial_dims, a, b, residual) for a, b in zip(fea[:-1], fea[1:], strict=True)
        )
        # decoder level j (finest j = 0) turns the level below into 2 * fea[j] channels at level j's size
        widths = [fea[-1]] + [2 * f for f in reversed(fea[1:-1])]
        self.ups = nn.ModuleList(
            _Up(spatial_dims, w, f, skip) for w, f in zip(widths, reversed(fea[:-1]), strict=True)
        )
        self.maps = nn.ModuleList(
            Conv[Conv.CONV, spatial_dims](2 * fea[j], out_channels, 1) for j in reversed(range(n_maps))
        )
        self.n_maps = n_maps
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles neither the f-string nor the check
            _check_divisible(x, self.divisor)
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        decoded = []
        for up in self.ups:
            y = up(y, skips.pop())
            decoded.append(y)
        # the n_maps finest scales, coarsest first (indexed, as TorchScript slices no module list)
        first = len(decoded) - self.n_maps
        out = decoded[first]
        for i, conv in enumerate(self.maps):
            m = conv(decoded[first + i])
            out = (
                m if i == 0 else m + F.interpolate(out, size=m.shape[2:], mode=self.mode, align_corners=False)
            )
        return out
