"""The attention U-Net of the WMH study: attention gates on the skips, optional pyramid input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from monai.networks.nets.basic_unet import TwoConv
from torch import nn

from medseg_monai.networks.unet import ClassicUNet

__all__ = ["AttentionGate", "AttentionUNet"]

_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


class AttentionGate(nn.Module):
    """Additive attention gate on a U-Net skip connection (Oktay et al., MIDL 2018; the WMH thesis,
    Røvang 2021, eq. 6.1-6.2 and Fig. 6.4).

    The skip features x (B, F_l, *S) are subsampled to the grid of the gating signal g
    (B, F_g, *S/2) from the coarser level by a 2x2 stride-2 convolution W_x; then

        q = psi^T relu(W_x^T x + W_g^T g + b_xg) + b_psi,    alpha = sigmoid(q)

    and alpha, upsampled (bi/trilinearly) to S, multiplies x. Returns (alpha * x, alpha) with
    alpha (B, 1, *S). The intermediate width F_int defaults to F_l // 2 as in Oktay et al.

    MONAI's ``AttentionBlock`` gates at the skip's resolution after upsampling g and puts batch
    norm in the gate; this follows eq. 6.1 (no norm, coarse grid, upsampled coefficients).
    """

    def __init__(
        self, spatial_dims: int, skip_channels: int, gating_channels: int, inter_channels: int | None = None
    ) -> None:
        super().__init__()
        inter = inter_channels or max(skip_channels // 2, 1)
        conv = Conv["conv", spatial_dims]
        self.mode = _LINEAR[spatial_dims]
        self.theta_x = conv(skip_channels, inter, kernel_size=2, stride=2, bias=False)  # W_x
        self.phi_g = conv(gating_channels, inter, kernel_size=1, bias=True)  # W_g and b_xg
        self.psi = conv(inter, 1, kernel_size=1, bias=True)  # psi and b_psi

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.theta_x(x)
        phi = self.phi_g(g)
        if phi.shape[2:] != theta.shape[2:]:  # odd skip sizes
            phi = F.interpolate(phi, size=theta.shape[2:], mode=self.mode, align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(theta + phi)))
        alpha = F.interpolate(alpha, size=x.shape[2:], mode=self.mode, align_corners=False)
        return x * alpha, alpha


class AttentionUNet(ClassicUNet):
    """The WMH thesis's attention U-Net (Røvang 2021, sec. 6.2, 8.3-8.4): :class:`ClassicUNet`
    (its "UNet256" with ``features=(32, 64, 128, 256, 512)``) with :class:`AttentionGate` on the
    skip connections and, optionally, pyramid input.

    - Gates: the skip of level l is gated by the decoder features one level below it (the
      bottleneck for the deepest skip), as in Oktay et al.'s grid attention. ``gated_skips``
      counts the gated skips from the deepest: 3 (default) as in Oktay et al. and the thesis's
      Fig. 8.5, which shows three attention maps; 4 gates every skip.
    - ``pyramid_input``: the input image, max-pooled (2x2, stride 2) to each encoder level below
      the first, is concatenated to that level's pooled features before its convolutions
      (sec. 6.2: "non-convolved but downsampled input"), so those convolutions take
      ``features[l-1] + in_channels`` channels.
    - The output is logits (the loss or post-transform applies the sigmoid).
    - ``attention_maps``: the gates' coefficients from the last forward, deepest first, each
      (B, 1, *spatial_l) and detached, for figures; ``forward(x, return_attention=True)``
      returns ``(logits, maps)`` with the maps still in the graph.

    Module names match :class:`ClassicUNet`, so a ClassicUNet state dict loads with
    ``strict=False`` and leaves only the gates newly initialised (the thesis's sec. 8.4
    pre-trained attention run; without pyramid input, whose first convolutions differ in width).
    MONAI's ``AttentionUnet`` downsamples by strided convolution, fixes batch norm and ReLU,
    gates at the fine resolution and neither exposes the gates nor has pyramid input.

    Input (B, in_channels, *spatial) with spatial sizes divisible by 16; output (B, out_channels,
    *spatial) logits.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
        bias: bool = False,
        dropout: float | tuple = 0.0,
        upsample: str = "deconv",
        out_bias: bool = False,
        pyramid_input: bool = False,
        gated_skips: int = 3,
    ) -> None:
        super().__init__(
            spatial_dims, in_channels, out_channels, features, act, norm, bias, dropout, upsample, out_bias
        )
        fea = tuple(features)
        if not 1 <= gated_skips <= 4:
            raise ValueError(f"gated_skips must be 1 to 4, got {gated_skips}")
        self.pyramid_input = pyramid_input
        if pyramid_input:
            for level in range(1, 5):
                down = getattr(self, f"down_{level}")
                down.convs = TwoConv(
                    spatial_dims, fea[level - 1] + in_channels, fea[level], act, norm, bias, dropout
                )
        # skip of level l (features fea[l]) gated by the level-(l+1) decoder features (fea[l+1])
        self.gates = nn.ModuleList(
            AttentionGate(spatial_dims, fea[level], fea[level + 1]) for level in (3, 2, 1, 0)[:gated_skips]
        )
        self.attention_maps: list[torch.Tensor] = []

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        skips = [self.conv_0(x)]
        image = x
        for level in range(1, 5):
            down = getattr(self, f"down_{level}")
            h = down.max_pooling(skips[-1])
            if self.pyramid_input:
                image = down.max_pooling(image)
                h = torch.cat([h, image], dim=1)
            skips.append(down.convs(h))

        maps = []
        u = skips[4]
        for i, (upcat, skip) in enumerate(
            zip((self.upcat_4, self.upcat_3, self.upcat_2, self.upcat_1), skips[3::-1], strict=True)
        ):
            if i < len(self.gates):
                skip, alpha = self.gates[i](skip, u)
                maps.append(alpha)
            u = upcat(u, skip)
        logits = self.final_conv(u)

        self.attention_maps = [m.detach() for m in maps]
        return (logits, maps) if return_attention else logits
