"""Networks of the studies that MONAI does not configure exactly, one module per family."""

from medseg_monai.networks.attention import AttentionGate, AttentionUNet
from medseg_monai.networks.cpu import BatchOneConv3d, fast_cpu_conv3d
from medseg_monai.networks.dropout_unet import EncoderDropoutUNet
from medseg_monai.networks.factorized import FactorizedConvUNet, weight_decay_groups
from medseg_monai.networks.multiscale import MultiScaleMapUNet
from medseg_monai.networks.unet import ClassicUNet

__all__ = [
    "AttentionGate",
    "AttentionUNet",
    "BatchOneConv3d",
    "ClassicUNet",
    "EncoderDropoutUNet",
    "FactorizedConvUNet",
    "MultiScaleMapUNet",
    "fast_cpu_conv3d",
    "weight_decay_groups",
]
