"""The WMH thesis's aggregation of validation figures: the mean over 12-slice mini-batches.

Sec. 7.3 (Røvang 2021): "The loss and evaluation metrics have been calculated by first finding
the loss and scores in a mini-batch (12 images) ... the mini-batches are all flattened before the
score is found. After all mini-batches for the epoch is complete, the final result is then the
average over all the mini-batch step results"; the best epoch is the one of lowest validation
loss. Every figure the thesis prints for Dice, recall and F3 (Tables 8.1-8.4, the captions of
fig. 8.12-8.15) is such a mean, mini-batches without lesions included (an empty mini-batch with an
empty prediction scores 1; one with false positives only scores low).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric

from medseg_monai.losses.tversky import FocalTverskyLoss
from medseg_monai.metrics.lesions import case_masks, voxel_scores

__all__ = ["MiniBatchMetrics"]

_COLUMNS = ("tp", "fp", "fn", "soft_tp", "soft_fp", "soft_fn")


class MiniBatchMetrics(CumulativeIterationMetric):
    """Dice, recall, precision, F-beta and the focal Tversky loss per mini-batch of
    ``batch_size`` consecutive slices, averaged over the mini-batches (thesis sec. 7.3).

    Each call takes whole volumes, ``y_pred`` (B, 1, X, Y, Z) probabilities (after the sigmoid)
    and ``y`` (B, 1, X, Y, Z) in {0, 1} (voxels equal to ``ignore_index`` left out), and stores
    per slice (along ``slice_axis`` of the spatial dims) the hard voxel counts at ``threshold``
    and the soft counts of the loss. ``summary()`` cuts the stored slices, in the order seen
    (volume after volume, as a sequential validation loader of slices with that batch size would
    give them), into mini-batches of ``batch_size`` (the last may be shorter), scores each
    flattened mini-batch with :func:`~medseg_monai.metrics.lesions.voxel_scores` (Omega =
    ``smooth``) and ``loss``'s formula, and averages: ``dice``, ``recall``, ``precision``,
    ``f3`` (for beta 3), ``loss``. Storage is six numbers per slice, so the volumes themselves are
    not kept.

    Args:
        loss: the focal Tversky loss whose alpha, beta, gamma and Omega score the mini-batches
            (the training loss; None leaves ``loss`` out).
        batch_size: slices per mini-batch (thesis: 12).
        slice_axis: spatial axis the slices are taken along (2 = axial after RAS orientation).
        headline: the figure ``aggregate()`` returns (default ``loss``, the thesis's key metric,
            or ``dice`` without a loss).
    """

    def __init__(
        self,
        loss: FocalTverskyLoss | None = None,
        batch_size: int = 12,
        slice_axis: int = 2,
        threshold: float = 0.5,
        smooth: float = 2.0,
        beta: float = 3.0,
        ignore_index: int | None = None,
        headline: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.loss = loss
        self.batch_size = batch_size
        self.slice_axis = slice_axis
        self.threshold = threshold
        self.smooth = smooth
        self.beta = beta
        self.ignore_index = ignore_index
        self.headline = headline or ("loss" if loss is not None else "dice")
        self.names = ("dice", "recall", "precision", f"f{beta:g}".replace(".", "_"), "loss")

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hard, ref = case_masks(y_pred, y, None, self.ignore_index, self.threshold)
        keep = (
            (torch.as_tensor(y) != self.ignore_index)
            if self.ignore_index is not None
            else torch.ones_like(ref)
        )
        prob = torch.as_tensor(y_pred).float().clamp(0, 1) * keep
        target = ref.float()
        # (B, 1, X, Y, Z) -> (B * n_slices, voxels of a slice), volume after volume
        axis = 2 + self.slice_axis

        def per_slice(x: torch.Tensor) -> torch.Tensor:
            x = x.float().movedim(axis, 2)
            return x.reshape(x.shape[0], x.shape[2], -1).sum(-1).reshape(-1)

        columns = [
            per_slice(hard & ref),
            per_slice(hard & ~ref),
            per_slice(~hard & ref),
            per_slice(prob * target),
            per_slice(prob * (1 - target)),  # prob is already 0 at ignored voxels
            per_slice((1 - prob) * target),
        ]
        return torch.stack(columns, dim=1).double()

    def _slices(self) -> np.ndarray:
        buffer = self.get_buffer()
        if buffer is None or len(buffer) == 0:
            return np.zeros((0, len(_COLUMNS)))
        return torch.as_tensor(buffer, dtype=torch.float64).reshape(-1, len(_COLUMNS)).cpu().numpy()

    def summary(self) -> dict[str, float]:
        """Mean over mini-batches of each figure (NaN when no slice was seen)."""
        slices = self._slices()
        if not len(slices):
            return dict.fromkeys(self.names, math.nan)
        starts = np.arange(0, len(slices), self.batch_size)
        batches = torch.from_numpy(np.add.reduceat(slices, starts, axis=0))  # (n_batches, 6)
        scores = voxel_scores(batches[:, :3], self.smooth, self.beta)  # (n_batches, 4)
        out = dict(zip(self.names[:4], scores.mean(0).tolist(), strict=True))
        if self.loss is not None:
            tp, fp, fn = batches[:, 3:].unbind(-1)
            out["loss"] = float(self.loss.from_counts(tp, fn, fp).mean())
        return out

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor(self.summary()[self.headline])
