"""The soft IoU loss of the LV study (Avetisian, sec. "2.1 Loss function": Rahman & Wang's IoU
loss extended to several classes)."""

from __future__ import annotations

import torch
from monai.networks import one_hot
from torch.nn.modules.loss import _Loss

__all__ = ["SoftIoULoss"]


class SoftIoULoss(_Loss):
    """Soft intersection over union of the foreground classes, as the LV study's formula (Avetisian,
    "Volumetric medical image segmentation with deep convolutional neural networks", the second
    section 2.1, "Loss function")::

        IoU = sum y[1:] * p[1:] / (sum y[1:] + sum p[1:] - sum y[1:] * p[1:])
        loss = 1 - IoU

    with y the one-hot reference, p the softmax of the logits over the class channel and ``[1:]``
    dropping the first (background) channel. Each sum is one sum over every element: every voxel
    of every image of the mini-batch and every foreground class. So there is a single IoU per
    mini-batch, with the foreground classes pooled into it (their intersections added, their
    unions added), not a mean of per-class or per-image IoUs. The paper writes L as the IoU
    itself, a quantity to maximise; we minimise 1 - IoU, as Rahman & Wang (ISVC 2016), whose loss
    the paper extends (-IoU has the same gradient). No smoothing term: the formula has none, and
    with softmax probabilities the denominator is positive (it is clamped to the smallest
    positive float only so that an underflow gives loss 1 rather than NaN).

    MONAI's ``DiceLoss(jaccard=True, softmax=True, to_onehot_y=True, include_background=False,
    batch=True, smooth_nr=0, smooth_dr=0)`` computes 1 - IoU per class and averages the classes,
    so it equals this loss only when there is a single foreground class; with two or more (e.g.
    ACDC's myocardium and LV cavity) the paper's pooled sum differs, hence this class.

    Args:
        input: (B, C, *spatial) logits, C >= 2 with channel 0 the background.
        target: (B, 1, *spatial) class indices in [0, C) or (B, C, *spatial) one-hot.

    Returns:
        scalar loss in [0, 1].
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = input.shape[1]
        if n < 2:
            raise ValueError(
                f"SoftIoULoss needs a background and at least one foreground channel, got input {tuple(input.shape)}"
            )
        if target.shape[1] == 1:
            target = one_hot(target.long(), num_classes=n)
        if target.shape != input.shape:
            raise ValueError(
                f"SoftIoULoss: target {tuple(target.shape)} must be (B, 1, ...) indices or one-hot like input {tuple(input.shape)}"
            )
        # at least float32 sums: under AMP a half-precision sum over a batch of volumes overflows
        dtype = torch.promote_types(input.dtype, torch.float32)
        p = torch.softmax(input.to(dtype), dim=1)[:, 1:]
        y = target.to(dtype)[:, 1:]
        intersection = (y * p).sum()
        union = y.sum() + p.sum() - intersection
        return 1 - intersection / union.clamp_min(torch.finfo(union.dtype).tiny)
