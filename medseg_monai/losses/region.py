"""Soft Dice of nested regions computed from class probabilities: BraTS's whole tumour, tumour
core and enhancing tumour scored by a softmax network over the label classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["RegionDiceLoss"]


class RegionDiceLoss(_Loss):
    """Soft Dice of regions that are unions of classes, from a softmax over the classes.

    For class probabilities p = softmax(input) and class indices y, each region r (a set of class
    indices, e.g. BraTS 2018's whole tumour {1, 2, 3}, tumour core {1, 3}, enhancing {3}) has the
    probability P_r = sum_{c in r} p_c and the reference Y_r = [y in r], and::

        loss = mean_r  1 - (2 sum P_r Y_r + smooth_nr) / (sum P_r + sum Y_r + smooth_dr)

    with each sum over every voxel of the mini-batch (``batch=True``, as nnU-Net's batch Dice) or
    per image, then averaged (``batch=False``). The regions are what BraTS scores; a per-class
    Dice (MONAI's ``DiceLoss``) never rewards a voxel of edema predicted as necrosis although both
    are whole tumour, so a network trained on it can miss a tumour whose classes look unlike the
    training cases' (e.g. a low-grade glioma without enhancement). Region-based training is
    nnU-Net's BraTS choice (Isensee et al., "nnU-Net for Brain Tumor Segmentation", BrainLes 2020),
    there with one sigmoid per region; summing softmax probabilities keeps the network's classes
    and the bundle's argmax post-processing. Pair it with cross-entropy over the classes
    (``SumOfLosses``).

    Args:
        regions: the class indices of each region.
        input: (B, C, *spatial) logits.
        target: (B, 1, *spatial) class indices in [0, C).

    Returns:
        scalar loss in [0, 1].
    """

    def __init__(
        self,
        regions: Sequence[Sequence[int]],
        batch: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        if not regions or any(not r for r in regions):
            raise ValueError(f"RegionDiceLoss needs non-empty regions of class indices, got {regions}")
        self.regions = [sorted({int(c) for c in r}) for r in regions]
        self.batch = batch
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = input.shape[1]
        if target.shape[1] != 1 or target.shape[2:] != input.shape[2:]:
            raise ValueError(
                f"RegionDiceLoss: target {tuple(target.shape)} must be (B, 1, ...) indices for {tuple(input.shape)}"
            )
        if max(max(r) for r in self.regions) >= n:
            raise ValueError(
                f"RegionDiceLoss: regions {self.regions} name a class beyond the input's {n} channels"
            )
        # float32 sums at least: under AMP a half-precision sum over a volume overflows
        dtype = torch.promote_types(input.dtype, torch.float32)
        p = torch.softmax(input.to(dtype), dim=1)
        y = F.one_hot(target[:, 0].long(), num_classes=n).movedim(-1, 1).to(dtype)
        member = torch.zeros(len(self.regions), n, dtype=dtype, device=input.device)
        for i, r in enumerate(self.regions):
            member[i, r] = 1.0
        # (B, C, ...) -> (B, R, ...): a region's probability / reference is the sum over its classes
        p_r = torch.einsum("rc,bc...->br...", member, p)
        y_r = torch.einsum("rc,bc...->br...", member, y)
        dims = [0, *range(2, p_r.ndim)] if self.batch else list(range(2, p_r.ndim))
        intersection = (p_r * y_r).sum(dims)
        total = p_r.sum(dims) + y_r.sum(dims)
        return (1 - (2 * intersection + self.smooth_nr) / (total + self.smooth_dr)).mean()
