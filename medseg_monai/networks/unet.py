"""The classic U-Net as the widely used PyTorch reference builds it, on MONAI's BasicUNet blocks."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.layers import Conv
from monai.networks.nets import BasicUNet
from monai.networks.nets.basic_unet import UpCat

__all__ = ["ClassicUNet"]


class ClassicUNet(BasicUNet):
    """The original U-Net (Ronneberger et al., MICCAI 2015) as in the widely used PyTorch reference
    (github.com/milesial/Pytorch-UNet): double 3x3 conv + norm + activation per level, 2x2 max-pool,
    channels doubling, transposed-conv upsampling to half the channels, concatenation skips and a
    1x1 output convolution.

    MONAI's ``BasicUNet`` has the same blocks except that its last up-step keeps all channels
    (``halves=False``); here every up-step halves them, as in the reference. Activation (e.g.
    ReLU or Mish) and norm (batch or group) are configuration, as is the output bias.

    Input (B, in_channels, *spatial) with spatial sizes divisible by 16; output (B, out_channels,
    *spatial) logits.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
        bias: bool = False,
        dropout: float | tuple = 0.0,
        upsample: str = "deconv",
        out_bias: bool = True,
    ) -> None:
        fea = tuple(features)
        if len(fea) != 5:
            raise ValueError(f"features must give the 5 encoder widths, got {fea}")
        super().__init__(
            spatial_dims, in_channels, out_channels, (*fea, fea[0]), act, norm, bias, dropout, upsample
        )
        self.upcat_1 = UpCat(
            spatial_dims, fea[1], fea[0], fea[0], act, norm, bias, dropout, upsample, halves=True
        )
        self.final_conv = Conv["conv", spatial_dims](fea[0], out_channels, kernel_size=1, bias=out_bias)
