"""Losses from the studies that MONAI does not provide, one module per family."""

from medseg_monai.losses.dice import ForegroundBackgroundDiceLoss, NegativeSoftDiceLoss, SumOfLosses
from medseg_monai.losses.iou import SoftIoULoss
from medseg_monai.losses.region import RegionDiceLoss
from medseg_monai.losses.tversky import FocalTverskyLoss

__all__ = [
    "FocalTverskyLoss",
    "ForegroundBackgroundDiceLoss",
    "NegativeSoftDiceLoss",
    "RegionDiceLoss",
    "SoftIoULoss",
    "SumOfLosses",
]
