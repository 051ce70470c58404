"""The focal Tversky loss of the WMH study (Abraham & Khan 2019, as the WMH thesis uses it)."""

from __future__ import annotations

import torch
from monai.losses import TverskyLoss
from torch.nn.modules.loss import _Loss

__all__ = ["FocalTverskyLoss"]


class FocalTverskyLoss(_Loss):
    """Focal Tversky loss over the whole mini-batch, as in the WMH thesis (Røvang 2021, sec. 4.2).

    With soft counts over every voxel of the flattened mini-batch (eq. 4.2), p the foreground
    probability and r the binary reference,

        TP = sum p r,   FN = sum (1 - p) r,   FP = sum p (1 - r)
        TI = (TP + Omega) / (TP + alpha FN + beta FP + Omega)            (eq. 4.8)
        loss = (1 - TI) ** gamma                                          (eq. 4.12)

    One TI for the whole batch, not one per image (sec. 7.3), so a slice without lesions adds
    only false positives. ``alpha`` weights false negatives; the thesis's default is
    (alpha, beta) = (0.7, 0.3) (sec. 7.6), its best runs use (0.85, 0.15). The exponent is
    ``gamma`` itself, not ``1 / gamma`` as in Abraham & Khan (ISBI 2019): the thesis takes their
    ``1 / gamma`` to be a typo (sec. 7.6), so gamma = 4/3 > 1 focuses on hard batches (low TI).
    Omega = 2 (sec. 7.6) keeps a batch whose only lesion is one missed voxel at TI = 2 / 2.7
    (eq. 4.10) and makes an empty reference with an empty prediction a loss of 0.

    The soft counts are MONAI's ``TverskyLoss`` (``batch=True``); note that MONAI names the
    false-positive weight ``alpha`` and the false-negative weight ``beta``, the reverse of
    eq. 4.8. MONAI has no focal exponent on it.

    Args:
        input: (B, 1, *spatial) logits (``sigmoid=True``, the thesis's network ends in a sigmoid)
            or probabilities.
        target: (B, 1, *spatial) in {0, 1}; voxels equal to ``ignore_index`` (e.g. -1 from
            ``RemapLabelsd(..., ignore_index=-1)`` for WMH 2017 label 2, other pathology) are left
            out of TP, FN and FP.

    Returns:
        scalar loss.
    """

    def __init__(
        self,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 4 / 3,
        smooth: float = 2.0,
        sigmoid: bool = True,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.smooth = float(smooth)
        self.ignore_index = ignore_index
        self.tversky = TverskyLoss(
            sigmoid=sigmoid,
            alpha=self.beta,  # MONAI's alpha weights false positives
            beta=self.alpha,  # MONAI's beta weights false negatives
            smooth_nr=self.smooth,
            smooth_dr=self.smooth,
            batch=True,
            ignore_index=ignore_index,
            reduction="none",
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape[1] != 1 or target.shape[1] != 1:
            raise ValueError(
                f"FocalTverskyLoss is binary: expected (B, 1, ...) input and target, got {tuple(input.shape)} and {tuple(target.shape)}"
            )
        # float32 sums: under AMP a half-precision sum of p over a batch of slices overflows
        one_minus_ti = self.tversky(input.float(), target.float())  # (1,): one TI for the batch
        # 1 - TI >= 0 in exact arithmetic; rounding must not give a NaN power
        return one_minus_ti.clamp_min(0).pow(self.gamma).sum()

    def from_counts(self, tp: torch.Tensor, fn: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        """The loss of eq. 4.8 and 4.12 from soft counts (any shape, one loss per element): what
        ``forward`` gives for a mini-batch with these sums, e.g. to score validation mini-batches
        from per-slice sums (``medseg_monai.metrics.MiniBatchMetrics``)."""
        ti = (tp + self.smooth) / (tp + self.alpha * fn + self.beta * fp + self.smooth)
        return (1 - ti).clamp_min(0).pow(self.gamma)
