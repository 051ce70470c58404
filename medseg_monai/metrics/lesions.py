"""The WMH thesis's evaluation (Røvang 2021, sec. 4.1, 7.3-7.5, Tables 8.5-8.17).

Voxel metrics on probabilities thresholded at 0.5 (>= 0.5 is lesion, sec. 4.1), with the
smoothing Omega of eq. 4.1-4.4 (Omega = 2, "for all experiments", sec. 7.6):

    dice      = (2 TP + Omega) / (2 TP + FP + FN + Omega)                      (eq. 4.4)
    recall    = (TP + Omega) / (TP + FN + Omega)                               (eq. 4.1)
    precision = (TP + Omega) / (TP + FP + Omega)                               (eq. 4.3)
    f_beta    = (1 + b^2) TP / ((1 + b^2) TP + FP + b^2 FN),  b = 3: F3        (eq. 4.5, unsmoothed)

A ratio whose denominator is 0 (possible only with ``smooth=0``, or for F-beta when the
reference and the prediction are both empty) is 1: both masks are empty, nothing to find and
nothing wrongly found. No voxel metric is ever NaN. How the figures of many slices or volumes
are combined is the caller's choice: the thesis's own aggregation (the mean over 12-slice
mini-batches, sec. 7.3) is :class:`medseg_monai.metrics.MiniBatchMetrics`; here
:class:`LesionMetrics` gives the per-volume figures (``volume_*``) and the figures of all voxels
of a data set at once (``pooled_*``).

Lesion-wise analysis on whole volumes (sec. 7.5, Tables 8.5-8.17): lesions are the connected
components of the reference and of the prediction with full connectivity (26-connected in 3D:
the thesis uses scikit-image's ``label``, whose default is full connectivity, and lists the
diagonal neighbours (x +- 1, y +- 1, z +- 1)). Size brackets by voxel count, default
[0, 10), [10, 400), [400, 1000), [1000, inf). Counted as the tables count, so that every table's
"Total" (predicted lesions) is TP + FP (Table 8.5: 441 = 266 + 175; Table 8.17: 9420 = 3144 + 6276):

- a reference lesion is detected (TP) when at least 60 % of its voxels are predicted, otherwise
  it is a FN; both counted in the bracket of the reference lesion's size;
- every predicted component that does not take part in a detection (touches no detected
  reference lesion) is a FP, counted in the bracket of its own size: a component that covers
  4 voxels of a 32-voxel lesion is a FP beside that lesion's FN;
- ``n_pred`` (the tables' "Total") = TP + FP;
- lesion precision = TP / (TP + FP), lesion recall = TP / (TP + FN); reproduces the tables'
  rates from their counts (Table 8.17: 3144 / 9420 = 0.33, 3103 / 3837 = 0.81, ...). A ratio
  with nothing in it is 1 only when the row has no reference and no predicted lesion at all,
  otherwise 0: predicting nothing in a case with lesions is precision 0, not 1;
- ``avg_recall`` ("Avg. recall (smooth)") = the mean over the bracket's reference lesions of
  each lesion's smooth voxel recall (predicted voxels in it + Omega) / (its voxels + Omega),
  computed on the lesion's own voxels (Table 8.5; later captions say "inside the lesions bounding
  box", which differs only where another lesion enters the box); NaN for a bracket without
  reference lesions (the tables print "-");
- ``large_lesion_recall`` = ``avg_recall`` of the last bracket, [1000, inf): the abstract's
  "the large and most important lesions had an average recall score of 0.93" is Table 8.17's
  [1000, ~) entry (the mean of its brackets from 10 voxels up would be 0.89).

Voxels to ignore (WMH 2017 label 2, other pathology): an ``ignore`` mask, or reference voxels
equal to ``ignore_index`` (-1 from ``RemapLabelsd(..., ignore_index=-1)``), are removed from both
the prediction and the reference before anything is counted or labelled: they are neither TP,
FP nor FN voxels, and a predicted component lying wholly inside them does not exist.

Beyond the thesis, :func:`challenge_metrics` and :class:`ChallengeMetrics` give the MICCAI WMH
2017 challenge's five figures of a volume (Kuijf et al., IEEE TMI 38(11), 2019), computed as the
challenge's own ``evaluation.py`` (github.com/hjkuijf/wmhchallenge) computes them, without the
thesis's smoothing or 60 % rule.

:func:`voxel_metrics` and :func:`lesion_table` are the pure functions (``lesion_table`` gives the
per-bracket table of one case, ready for ``pandas.DataFrame.from_dict(..., orient="index")``);
:func:`lesion_rates` turns counts into the tables' rates; :class:`LesionMetrics` is a MONAI
``CumulativeIterationMetric`` for ``IgniteMetricHandler(..., save_details=True)``: one row per
case, columns ``names``, and ``summary()`` pools the cases as the tables do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric
from scipy import ndimage

__all__ = [
    "BRACKETS",
    "CHALLENGE_NAMES",
    "ChallengeMetrics",
    "LesionMetrics",
    "LesionTableWriter",
    "bracket_labels",
    "challenge_metrics",
    "lesion_rates",
    "lesion_table",
    "voxel_metrics",
    "voxel_scores",
]

BRACKETS: tuple[float, ...] = (0, 10, 400, 1000)
"""Lower edges of the lesion size brackets in voxels; the last bracket is open-ended."""

_VOXEL = ("dice", "recall", "precision")
_COUNTS = ("n_ref", "n_pred", "tp", "fn", "fp")
_RATES = ("lesion_precision", "lesion_recall", "avg_recall")


def _ratio(num: float, den: float, nothing: bool) -> float:
    """num / den; with den 0, 1 when the row holds nothing at all (``nothing``), else 0."""
    if den == 0:
        return 1.0 if nothing else 0.0
    return float(num) / float(den)


def _check_brackets(brackets: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(b) for b in brackets)
    if not edges or edges[0] != 0 or any(hi <= lo for lo, hi in zip(edges[:-1], edges[1:], strict=True)):
        raise ValueError(f"brackets must be increasing lower edges starting at 0, got {brackets}")
    return edges


def bracket_labels(brackets: Sequence[float] = BRACKETS) -> list[str]:
    """Names of the brackets for tables and columns: ``0-10``, ``10-400``, ..., ``1000-inf``."""
    edges = [*_check_brackets(brackets), math.inf]
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _fbeta_name(beta: float) -> str:
    return f"f{beta:g}".replace(".", "_")


def voxel_scores(counts: torch.Tensor, smooth: float = 2.0, beta: float = 3.0) -> torch.Tensor:
    """(..., 3) voxel TP, FP, FN -> (..., 4) dice, recall, precision, F-beta (eq. 4.1-4.5; 0/0 -> 1)."""
    tp, fp, fn = counts.double().unbind(-1)
    b2 = beta**2

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))

    return torch.stack(
        [
            ratio(2 * tp + smooth, 2 * tp + fp + fn + smooth),
            ratio(tp + smooth, tp + fn + smooth),
            ratio(tp + smooth, tp + fp + smooth),
            ratio((1 + b2) * tp, (1 + b2) * tp + fp + b2 * fn),
        ],
        dim=-1,
    )


def _as_bool(x: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return array >= threshold


def _masks(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    ignore: np.ndarray | torch.Tensor | None,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Binary prediction (>= threshold) and reference (>= 0.5, so -1 is not lesion), both
    without the ignored voxels."""
    p, r = _as_bool(pred, threshold), _as_bool(ref, 0.5)
    if p.shape != r.shape:
        raise ValueError(f"prediction {p.shape} and reference {r.shape} differ in shape")
    if ignore is not None:
        keep = ~_as_bool(ignore, 0.5)
        p, r = p & keep, r & keep
    return p, r


def _voxel_counts(p: np.ndarray, r: np.ndarray) -> list[int]:
    return [int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())]


def voxel_metrics(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    ignore: np.ndarray | torch.Tensor | None = None,
    threshold: float = 0.5,
    smooth: float = 2.0,
    beta: float = 3.0,
) -> dict[str, float]:
    """Smooth Dice, recall, precision and F-beta (``f3`` for beta 3) of one prediction, any shape.

    ``pred``: probabilities (>= ``threshold`` is lesion) or a binary mask; ``ref``: {0, 1}
    (values < 0.5, e.g. -1, are not lesion); ``ignore``: non-zero where voxels are left out.
    """
    p, r = _masks(pred, ref, ignore, threshold)
    scores = voxel_scores(torch.tensor(_voxel_counts(p, r)), smooth, beta).tolist()
    return dict(zip((*_VOXEL, _fbeta_name(beta)), scores, strict=True))


def _lesion_sums(
    pred: np.ndarray,
    ref: np.ndarray,
    brackets: tuple[float, ...],
    detection: float,
    connectivity: int | None,
    smooth: float,
) -> np.ndarray:
    """(n_brackets, 5): n_ref, tp, fn, fp and the sum of per-lesion smooth recalls."""
    structure = ndimage.generate_binary_structure(ref.ndim, connectivity or ref.ndim)
    ref_lab, n_ref = ndimage.label(ref, structure)
    pred_lab, n_pred = ndimage.label(pred, structure)
    ref_size = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:]
    covered = np.bincount(ref_lab[pred], minlength=n_ref + 1)[1:]  # predicted voxels in each lesion
    pred_size = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]

    detected = covered >= detection * ref_size - 1e-9  # 3 of 5 voxels is 60 %, despite rounding
    in_detected = np.concatenate([[False], detected])[ref_lab]  # voxels of detected lesions
    detecting = np.bincount(pred_lab[in_detected], minlength=n_pred + 1)[1:] > 0
    recall = (covered + smooth) / (ref_size + smooth)
    n = len(brackets)
    ref_bracket = np.searchsorted(brackets, ref_size, side="right") - 1
    pred_bracket = np.searchsorted(brackets, pred_size, side="right") - 1
    n_ref_b = np.bincount(ref_bracket, minlength=n)
    tp_b = np.bincount(ref_bracket, weights=detected, minlength=n)
    return np.stack(
        [
            n_ref_b,
            tp_b,
            n_ref_b - tp_b,
            np.bincount(pred_bracket, weights=~detecting, minlength=n),
            np.bincount(ref_bracket, weights=recall, minlength=n),
        ],
        axis=1,
    ).astype(np.float64)


def lesion_rates(tp: float, fn: float, fp: float) -> dict[str, float]:
    """The tables' rates from their counts: ``n_pred`` (their "Total") = TP + FP, lesion
    precision TP / (TP + FP) and lesion recall TP / (TP + FN); an empty ratio is 1 only when
    there is neither a reference nor a predicted lesion, else 0."""
    nothing = tp + fn + fp == 0
    return {
        "n_pred": tp + fp,
        "lesion_precision": _ratio(tp, tp + fp, nothing),
        "lesion_recall": _ratio(tp, tp + fn, nothing),
    }


def _table_from_sums(sums: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    rows = {}
    for label, s in zip([*labels, "all"], [*sums, sums.sum(axis=0)], strict=True):
        n_ref, tp, fn, fp, recall_sum = (float(v) for v in s)
        rates = lesion_rates(tp, fn, fp)
        rows[label] = {
            "n_ref": n_ref,
            "n_pred": rates["n_pred"],
            "tp": tp,
            "fn": fn,
            "fp": fp,
            "lesion_precision": rates["lesion_precision"],
            "lesion_recall": rates["lesion_recall"],
            "avg_recall": recall_sum / n_ref if n_ref else math.nan,
        }
    return rows


def lesion_table(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    ignore: np.ndarray | torch.Tensor | None = None,
    threshold: float = 0.5,
    detection: float = 0.6,
    brackets: Sequence[float] = BRACKETS,
    connectivity: int | None = None,
    smooth: float = 2.0,
) -> dict[str, dict[str, float]]:
    """Per-bracket lesion table of one volume (the thesis's Tables 8.5-8.17 for one case).

    Args:
        pred: (X, Y, Z) probabilities (>= ``threshold`` is lesion) or a binary mask; any number
            of dimensions, components are found in all of them.
        ref: same shape, {0, 1}; values < 0.5 (e.g. the ignore value -1) are not lesion.
        ignore: non-zero where voxels are left out of both masks before labelling.
        detection: fraction of a reference lesion's voxels that must be predicted for a TP.
        brackets: lower edges of the size brackets in voxels (the last is open-ended).
        connectivity: as in ``scipy.ndimage.generate_binary_structure``; None = full (26 in 3D).
        smooth: Omega of the per-lesion smooth recall.

    Returns:
        ``{bracket label: row, ..., "all": row}``, each row with ``n_ref`` (reference lesions),
        ``n_pred`` (TP + FP, the tables' "Total"), ``tp``, ``fn``, ``fp``, ``lesion_precision``,
        ``lesion_recall``, ``avg_recall`` (NaN without reference lesions); "all" sums the counts
        over brackets and averages the per-lesion recall over all reference lesions.
    """
    edges = _check_brackets(brackets)
    p, r = _masks(pred, ref, ignore, threshold)
    return _table_from_sums(_lesion_sums(p, r, edges, detection, connectivity, smooth), bracket_labels(edges))


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def case_masks(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    ignore: torch.Tensor | None,
    ignore_index: int | None,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, *spatial) prediction and reference -> boolean masks without the ignored voxels."""
    y_pred, y = _plain(y_pred), _plain(y)
    if y_pred.shape != y.shape or y_pred.shape[1] != 1:
        raise ValueError(
            f"expected (B, 1, *spatial) prediction and reference of one shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}"
        )
    skip = torch.zeros_like(y, dtype=torch.bool) if ignore is None else _plain(ignore).to(y.device) > 0.5
    if ignore_index is not None:
        skip = skip | (y == ignore_index)
    return (y_pred >= threshold) & ~skip, (y >= 0.5) & ~skip


class LesionMetrics(CumulativeIterationMetric):
    """Voxel and lesion-wise metrics per case (one row per volume), for evaluators.

    ``y_pred`` (B, 1, X, Y, Z) probabilities (>= ``threshold`` is lesion) or binary masks of whole
    volumes (e.g. restacked by :class:`~medseg_monai.inferers.NeighbourSliceInferer` and passed
    through a sigmoid); ``y`` (B, 1, X, Y, Z) in {0, 1}, voxels equal to ``ignore_index`` left
    out (or ``ignore=`` a mask when calling directly). Row columns, in order (``names``):

    - ``volume_dice``, ``volume_recall``, ``volume_precision``, ``volume_f3``: :func:`voxel_metrics`
      of the case; ``voxel_tp``, ``voxel_fp``, ``voxel_fn``: its voxel counts;
    - ``n_ref``, ``n_pred``, ``tp``, ``fn``, ``fp``, ``lesion_precision``, ``lesion_recall``,
      ``avg_recall``: the "all" row of :func:`lesion_table`;
    - ``large_lesion_recall``: ``avg_recall`` of the last bracket (NaN without such lesions);
    - for each bracket b (``bracket_labels``): ``n_ref_b``, ``n_pred_b``, ``tp_b``, ``fn_b``,
      ``fp_b``, ``lesion_precision_b``, ``lesion_recall_b``, ``avg_recall_b``.

    ``table()`` pools the cases as the thesis's tables do (counts summed over volumes, the
    per-lesion recall averaged over all lesions of a bracket); ``summary()`` gives the data set's
    figures: the pooled table (every column above but the voxel ones, same names),
    ``volume_*`` as the mean over cases and ``pooled_*`` from the voxel counts of all cases;
    ``aggregate(name)`` returns one of them (default ``headline``) as a scalar tensor.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        smooth: float = 2.0,
        beta: float = 3.0,
        ignore_index: int | None = None,
        detection: float = 0.6,
        brackets: Sequence[float] = BRACKETS,
        connectivity: int | None = None,
        headline: str = "large_lesion_recall",
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.smooth = smooth
        self.beta = beta
        self.ignore_index = ignore_index
        self.detection = detection
        self.brackets = _check_brackets(brackets)
        self.labels = bracket_labels(self.brackets)
        self.connectivity = connectivity
        self.headline = headline
        self.voxel_names = tuple(f"volume_{n}" for n in (*_VOXEL, _fbeta_name(beta)))
        self.lesion_names = (*_COUNTS, *_RATES)
        self.names = (
            *self.voxel_names,
            "voxel_tp",
            "voxel_fp",
            "voxel_fn",
            *self.lesion_names,
            "large_lesion_recall",
            *(f"{c}_{b}" for b in self.labels for c in self.lesion_names),
        )

    def _row(self, p: np.ndarray, r: np.ndarray) -> list[float]:
        counts = _voxel_counts(p, r)
        voxel = voxel_scores(torch.tensor(counts), self.smooth, self.beta).tolist()
        sums = _lesion_sums(p, r, self.brackets, self.detection, self.connectivity, self.smooth)
        table = _table_from_sums(sums, self.labels)
        per_bracket = [table[b][c] for b in self.labels for c in self.lesion_names]
        lesions = [table["all"][c] for c in self.lesion_names]
        return [*voxel, *counts, *lesions, table[self.labels[-1]]["avg_recall"], *per_bracket]

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> torch.Tensor:
        p, r = case_masks(y_pred, y, ignore, self.ignore_index, self.threshold)
        p_np, r_np = p[:, 0].cpu().numpy(), r[:, 0].cpu().numpy()
        rows = [self._row(pi, ri) for pi, ri in zip(p_np, r_np, strict=True)]
        return torch.tensor(rows, dtype=torch.float64, device=y_pred.device)

    def _rows(self) -> np.ndarray:
        buffer = self.get_buffer()
        if buffer is None or len(buffer) == 0:
            return np.zeros((0, len(self.names)))
        return torch.as_tensor(buffer, dtype=torch.float64).reshape(-1, len(self.names)).cpu().numpy()

    def table(self) -> dict[str, dict[str, float]]:
        """The lesion table pooled over all cases so far (format of :func:`lesion_table`)."""
        rows = self._rows()
        column = {name: i for i, name in enumerate(self.names)}
        sums = np.zeros((len(self.labels), 5))
        for i, b in enumerate(self.labels):
            n_ref = rows[:, column[f"n_ref_{b}"]]
            sums[i, :4] = [rows[:, column[f"{c}_{b}"]].sum() for c in ("n_ref", "tp", "fn", "fp")]
            sums[i, 4] = np.nansum(rows[:, column[f"avg_recall_{b}"]] * n_ref)
        return _table_from_sums(sums, self.labels)

    def summary(self) -> dict[str, float]:
        """The data set's figures: pooled lesion table, ``volume_*`` case means, ``pooled_*``."""
        rows = self._rows()
        column = {name: i for i, name in enumerate(self.names)}
        out = {
            name: float(np.nanmean(rows[:, column[name]])) if len(rows) else math.nan
            for name in self.voxel_names
        }
        counts = torch.tensor([rows[:, column[f"voxel_{c}"]].sum() for c in ("tp", "fp", "fn")])
        pooled = voxel_scores(counts, self.smooth, self.beta).tolist()
        out.update(
            {n.replace("volume_", "pooled_"): v for n, v in zip(self.voxel_names, pooled, strict=True)}
        )
        table = self.table()
        out.update(table["all"])
        out.update({f"{c}_{b}": table[b][c] for b in self.labels for c in self.lesion_names})
        out["large_lesion_recall"] = table[self.labels[-1]]["avg_recall"]
        return out

    def aggregate(self, name: str | None = None) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor(self.summary()[name or self.headline])


CHALLENGE_NAMES: tuple[str, ...] = (
    "challenge_dice",
    "challenge_hd95",
    "challenge_avd",
    "challenge_lesion_recall",
    "challenge_lesion_f1",
)
"""The WMH 2017 challenge's figures: Dice, 95th-percentile Hausdorff distance (mm), absolute volume
difference (%), lesion recall and lesion F1."""


def _boundary(mask: np.ndarray, slice_axis: int) -> np.ndarray:
    """``getHausdorff``'s ORIGINAL - ERODED: ``sitk.BinaryErode(image, (1, 1, 0))`` is ITK's ball of
    radius 1 in-plane, a full 3 x 3 square within each slice, nothing across slices, and ITK's
    erosion counts the image border as foreground (checked against SimpleITK in the tests)."""
    shape = [3] * mask.ndim
    if mask.ndim == 3:
        shape[slice_axis] = 1
    return mask & ~ndimage.binary_erosion(mask, np.ones(shape, bool), border_value=1)


def _hd95(ref: np.ndarray, pred: np.ndarray, linear: np.ndarray, slice_axis: int) -> float:
    """``getHausdorff``: the larger of the two directed 95th percentiles (numpy's linear
    interpolation) of the distances in mm from each boundary voxel to the nearest of the other
    mask's; NaN when nothing is predicted (as the script) or the reference is empty (it fails)."""
    from scipy.spatial import cKDTree

    if not pred.any() or not ref.any():
        return math.nan
    a, b = (np.argwhere(_boundary(m, slice_axis)) @ linear.T for m in (ref, pred))
    to_ref, to_pred = cKDTree(a).query(b)[0], cKDTree(b).query(a)[0]
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def challenge_metrics(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    ignore: np.ndarray | torch.Tensor | None = None,
    threshold: float = 0.5,
    affine: np.ndarray | torch.Tensor | None = None,
    slice_axis: int = -1,
) -> dict[str, float]:
    """The WMH 2017 challenge's figures of one volume, as its ``evaluation.py`` computes them.

    Each definition is the script's (function named), none the thesis's:

    - masks (``getImages``): the prediction thresholded (>= ``threshold``, the script's 0.5 for
      float images), the reference's WMH (label 1); predicted voxels on other pathology (label 2:
      here non-zero ``ignore``, in :class:`ChallengeMetrics` ``ignore_index``) are removed;
    - ``challenge_dice`` (``getDSC``): 2 |P & R| / (|P| + |R|), unsmoothed; NaN when both are empty;
    - ``challenge_hd95`` (``getHausdorff``): boundary voxels = mask minus its in-plane erosion
      (3 x 3 square in each slice along ``slice_axis``: the file's third axis in the script, axial
      for WMH 2017, the S axis of our RAS volumes), placed in mm by ``affine`` (voxel -> world;
      None: 1 mm voxels); the larger of the two directed 95th percentiles of nearest-neighbour
      distances; NaN when nothing is predicted;
    - ``challenge_avd`` (``getAVD``): |V_R - V_P| / V_R x 100, voxel counts; NaN for an empty
      reference (where the script divides by zero);
    - ``challenge_lesion_recall``, ``challenge_lesion_f1`` (``getLesionDetection``): lesions are 3D
      connected components with full connectivity (26 neighbours; ``SetFullyConnected(True)``); a
      reference lesion is detected when any predicted voxel lies in it, precision is the share of
      predicted components touching the reference; recall, precision 1 when there is nothing to
      count, F1 = 2 PR / (P + R), 0 when both are 0.
    """
    p, r = _masks(pred, ref, ignore, threshold)
    n_pred, n_ref, tp = int(p.sum()), int(r.sum()), int((p & r).sum())
    linear = np.eye(p.ndim) if affine is None else np.asarray(affine, dtype=np.float64)[: p.ndim, : p.ndim]
    structure = ndimage.generate_binary_structure(p.ndim, p.ndim)
    ref_lab, n_lesions = ndimage.label(r, structure)
    pred_lab, n_found = ndimage.label(p, structure)
    hit = p & r
    recall = len(np.unique(ref_lab[hit])) / n_lesions if n_lesions else 1.0
    precision = len(np.unique(pred_lab[hit])) / n_found if n_found else 1.0
    return {
        "challenge_dice": 2 * tp / (n_pred + n_ref) if n_pred + n_ref else math.nan,
        "challenge_hd95": _hd95(r, p, linear, slice_axis),
        "challenge_avd": abs(n_ref - n_pred) / n_ref * 100 if n_ref else math.nan,
        "challenge_lesion_recall": recall,
        "challenge_lesion_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def _case_affines(y: Any, n: int) -> list[np.ndarray | None]:
    """Each case's voxel -> world affine from the reference's MetaTensor (None for a plain tensor)."""
    if not isinstance(y, MetaTensor):
        return [None] * n
    affine = y.affine.detach().cpu().double().numpy()
    return [affine] * n if affine.ndim == 2 else list(affine)


class ChallengeMetrics(CumulativeIterationMetric):
    """The WMH 2017 challenge's figures per case (:func:`challenge_metrics`), for evaluators.

    ``y_pred`` (B, 1, X, Y, Z) probabilities or masks of whole volumes on the reference's grid,
    ``y`` (B, 1, X, Y, Z) in {0, 1}, voxels equal to ``ignore_index`` left out; distances in mm
    from ``y``'s MetaTensor affine. Row columns: ``names`` (``CHALLENGE_NAMES``). The script scores
    one volume; the data set's figure is the mean over cases, a case where a figure is undefined
    (NaN: no prediction for the Hausdorff distance, no reference lesion) left out of that mean
    (``summary()``; ``medseg_monai.handlers.CaseMetrics`` does the same).
    """

    names = CHALLENGE_NAMES

    def __init__(
        self,
        threshold: float = 0.5,
        ignore_index: int | None = None,
        slice_axis: int = -1,
        headline: str = "challenge_dice",
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.ignore_index = ignore_index
        self.slice_axis = slice_axis
        self.headline = headline

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> torch.Tensor:
        affines = _case_affines(y, y.shape[0])
        p, r = case_masks(y_pred, y, ignore, self.ignore_index, self.threshold)
        rows = [
            list(challenge_metrics(pi, ri, affine=a, slice_axis=self.slice_axis).values())
            for pi, ri, a in zip(p[:, 0].cpu().numpy(), r[:, 0].cpu().numpy(), affines, strict=True)
        ]
        return torch.tensor(rows, dtype=torch.float64, device=y_pred.device)

    def summary(self) -> dict[str, float]:
        """The mean of each figure over the cases where it is defined (NaN where none is)."""
        buffer = self.get_buffer()
        rows = (
            torch.as_tensor(buffer, dtype=torch.float64).reshape(-1, len(self.names))
            if buffer is not None and len(buffer)
            else torch.full((1, len(self.names)), math.nan, dtype=torch.float64)
        )
        return {name: float(torch.nanmean(rows[:, i])) for i, name in enumerate(self.names)}

    def aggregate(self, name: str | None = None) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor(self.summary()[name or self.headline])


class LesionTableWriter:
    """Write the pooled lesion-wise table of a ``medseg_monai.metrics.LesionMetrics`` handler at each
    evaluator epoch end: ``<prefix>lesion_table.csv`` (per size bracket TP/FN/FP, lesion precision
    and recall, average recall) and ``<prefix>lesion_brackets.png`` (detected and missed reference
    lesions and false positives per bracket, as the WMH thesis's fig. 8.24)."""

    rank0_only: ClassVar[bool] = True  # one table: rank 0 writes it (runtime.for_this_rank)

    def __init__(self, metric: Any, output_dir: str, prefix: str = "") -> None:
        self.metric = getattr(metric, "metric_fn", metric)
        self.output_dir = Path(output_dir)
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import csv

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        table = self.metric.table()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = list(next(iter(table.values())))
        with (self.output_dir / f"{self.prefix}lesion_table.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["bracket", *fields])
            writer.writerows([b, *(row[c] for c in fields)] for b, row in table.items())
        brackets = [b for b in table if b != "all"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        x = range(len(brackets))
        for offset, (col, colour) in enumerate(
            (("tp", "tab:green"), ("fn", "tab:red"), ("fp", "tab:orange"))
        ):
            ax.bar(
                [i + (offset - 1) * 0.27 for i in x],
                [table[b][col] for b in brackets],
                0.27,
                label=col.upper(),
                color=colour,
            )
        ax.set_xticks(list(x), [f"[{b}) voxels" for b in brackets])
        ax.set_ylabel("lesions")
        ax.set_title(f"lesion detection per size bracket (recall {table['all']['lesion_recall']:.2f})")
        ax.legend()
        fig.savefig(self.output_dir / f"{self.prefix}lesion_brackets.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
