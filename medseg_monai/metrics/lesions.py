"""The WMH thesis's evaluation (Røvang 2021, sec. 4.1, 7.3-7.5, Tables 8.5-8.17).

Voxel metrics on probabilities thresholded at 0.5 (>= 0.5 is lesion, sec. 4.1), with the
smoothing Omega of eq. 4.1-4.4 (Omega = 2, "for all experiments", sec. 7.6):

    dice      = (2 TP + Omega) / (2 TP + FP + FN + Omega)                      (eq. 4.4)
    recall    = (TP + Omega) / (TP + FN + Omega)                               (eq. 4.1)
    precision = (TP + Omega) / (TP + FP + Omega)                               (eq. 4.3)
    f_beta    = (1 + b^2) TP / ((1 + b^2) TP + FP + b^2 FN),  b = 3: F3        (eq. 4.5, unsmoothed)

A ratio whose denominator is 0 (possible only with ``smooth=0``, or for F-beta when the
reference and the prediction are both empty) is 1: nothing to find and nothing wrongly found.
So an empty reference with an empty prediction scores 1 everywhere, recall is 1 when the
reference is empty and precision 1 when nothing is predicted; no metric is ever NaN.

Lesion-wise analysis on whole volumes (sec. 7.5, Tables 8.5-8.17): lesions are the connected
components of the reference and of the prediction with full connectivity (26-connected in 3D:
the thesis uses scikit-image's ``label``, whose default is full connectivity, and lists the
diagonal neighbours (x +- 1, y +- 1, z +- 1)). Size brackets by voxel count, default
[0, 10), [10, 400), [400, 1000), [1000, inf):

- a reference lesion is detected (TP) when at least 60 % of its voxels are predicted, otherwise
  it is a FN; both counted in the bracket of the reference lesion's size;
- a predicted component that touches no reference lesion is a FP, counted in the bracket of
  its own size (the thesis counts TP, FN and FP "for predicted lesions" without defining FP);
- lesion precision = TP / (TP + FP), lesion recall = TP / (TP + FN) (1 when the denominator is 0);
- ``avg_recall`` ("Avg. recall (smooth)") = the mean over the bracket's reference lesions of
  each lesion's smooth voxel recall (predicted voxels in it + Omega) / (its voxels + Omega),
  computed on the lesion's own voxels (Table 8.5; later captions say "inside the lesions bounding
  box", which differs only where another lesion enters the box); 1 for a bracket without lesions;
- ``average_recall`` (one number per case or data set, the abstract's "average recall ... for
  clinically relevant lesion sizes") = the mean of the brackets' ``avg_recall`` over brackets
  from ``relevant_from`` voxels up (default 10: the brackets the thesis reports, it prints "-" for
  [0, 10)) that have reference lesions; 1 when none has.

Voxels to ignore (WMH 2017 label 2, other pathology): an ``ignore`` mask, or reference voxels
equal to ``ignore_index`` (-1 from ``RemapLabelsd(..., ignore_index=-1)``), are removed from both
the prediction and the reference before anything is counted or labelled: they are neither TP,
FP nor FN voxels, and a predicted component lying wholly inside them does not exist.

:func:`voxel_metrics` and :func:`lesion_table` are the pure functions (``lesion_table`` gives the
per-bracket table of one case, ready for ``pandas.DataFrame.from_dict(..., orient="index")``);
:class:`LesionMetrics` is a MONAI ``CumulativeIterationMetric`` for
``IgniteMetricHandler(..., save_details=True)``: one row per case, columns ``names``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric
from scipy import ndimage

__all__ = [
    "BRACKETS",
    "LesionMetrics",
    "LesionTableWriter",
    "average_recall",
    "bracket_labels",
    "lesion_table",
    "voxel_metrics",
]

BRACKETS: tuple[float, ...] = (0, 10, 400, 1000)
"""Lower edges of the lesion size brackets in voxels; the last bracket is open-ended."""

_VOXEL = ("dice", "recall", "precision")
_LESION = ("n_ref", "n_pred", "tp", "fn", "fp", "lesion_precision", "lesion_recall", "avg_recall")
_PER_BRACKET = ("n_ref", "n_pred", "tp", "fn", "fp", "avg_recall")


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num) / float(den)


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


def _voxel_scores(counts: torch.Tensor, smooth: float, beta: float) -> torch.Tensor:
    """(..., 3) TP, FP, FN -> (..., 4) dice, recall, precision, F-beta (0/0 -> 1)."""
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
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    scores = _voxel_scores(torch.tensor([tp, fp, fn]), smooth, beta).tolist()
    return dict(zip((*_VOXEL, _fbeta_name(beta)), scores, strict=True))


def _lesion_sums(
    pred: np.ndarray,
    ref: np.ndarray,
    brackets: tuple[float, ...],
    detection: float,
    connectivity: int | None,
    smooth: float,
) -> np.ndarray:
    """(n_brackets, 6): n_ref, n_pred, tp, fn, fp and the sum of per-lesion smooth recalls."""
    structure = ndimage.generate_binary_structure(ref.ndim, connectivity or ref.ndim)
    ref_lab, n_ref = ndimage.label(ref, structure)
    pred_lab, n_pred = ndimage.label(pred, structure)
    ref_size = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:]
    covered = np.bincount(ref_lab[pred], minlength=n_ref + 1)[1:]  # predicted voxels in each lesion
    pred_size = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]
    touches = np.bincount(pred_lab[ref], minlength=n_pred + 1)[1:] > 0

    detected = covered >= detection * ref_size - 1e-9  # 3 of 5 voxels is 60 %, despite rounding
    recall = (covered + smooth) / (ref_size + smooth)
    n = len(brackets)
    ref_bracket = np.searchsorted(brackets, ref_size, side="right") - 1
    pred_bracket = np.searchsorted(brackets, pred_size, side="right") - 1
    n_ref_b = np.bincount(ref_bracket, minlength=n)
    tp_b = np.bincount(ref_bracket, weights=detected, minlength=n)
    return np.stack(
        [
            n_ref_b,
            np.bincount(pred_bracket, minlength=n),
            tp_b,
            n_ref_b - tp_b,
            np.bincount(pred_bracket, weights=~touches, minlength=n),
            np.bincount(ref_bracket, weights=recall, minlength=n),
        ],
        axis=1,
    ).astype(np.float64)


def _table_from_sums(sums: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    rows = {}
    for label, s in zip([*labels, "all"], [*sums, sums.sum(axis=0)], strict=True):
        n_ref, n_pred, tp, fn, fp, recall_sum = (float(v) for v in s)
        rows[label] = {
            "n_ref": n_ref,
            "n_pred": n_pred,
            "tp": tp,
            "fn": fn,
            "fp": fp,
            "lesion_precision": _ratio(tp, tp + fp),
            "lesion_recall": _ratio(tp, tp + fn),
            "avg_recall": _ratio(recall_sum, n_ref),
        }
    return rows


def average_recall(
    table: Mapping[str, Mapping[str, float]], brackets: Sequence[float] = BRACKETS, relevant_from: float = 10
) -> float:
    """Mean of the brackets' ``avg_recall`` over brackets whose lower edge is at least
    ``relevant_from`` voxels and that have reference lesions; 1 when none has."""
    edges = _check_brackets(brackets)
    values = [
        table[label]["avg_recall"]
        for lo, label in zip(edges, bracket_labels(edges), strict=True)
        if lo >= relevant_from and table[label]["n_ref"] > 0
    ]
    return float(np.mean(values)) if values else 1.0


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
        ``n_pred`` (predicted components), ``tp``, ``fn``, ``fp``, ``lesion_precision``,
        ``lesion_recall``, ``avg_recall``; "all" sums the counts over brackets and averages the
        per-lesion recall over all reference lesions.
    """
    edges = _check_brackets(brackets)
    p, r = _masks(pred, ref, ignore, threshold)
    return _table_from_sums(_lesion_sums(p, r, edges, detection, connectivity, smooth), bracket_labels(edges))


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _case_masks(
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
    volumes (e.g. restacked by :class:`~medseg_monai.slices.NeighbourSliceInferer` and passed
    through a sigmoid); ``y`` (B, 1, X, Y, Z) in {0, 1}, voxels equal to ``ignore_index`` left
    out (or ``ignore=`` a mask when calling directly). Row columns, in order (``names``):

    - ``dice``, ``recall``, ``precision``, ``f3``: :func:`voxel_metrics`;
    - ``n_ref``, ``n_pred``, ``tp``, ``fn``, ``fp``, ``lesion_precision``, ``lesion_recall``,
      ``avg_recall``: the "all" row of :func:`lesion_table`;
    - ``average_recall``: :func:`average_recall` of the case;
    - for each bracket b (``bracket_labels``): ``n_ref_b``, ``n_pred_b``, ``tp_b``, ``fn_b``,
      ``fp_b``, ``avg_recall_b``.

    ``table()`` pools the cases as the thesis's tables do (counts summed over volumes, the
    per-lesion recall averaged over all lesions of a bracket); ``aggregate(name)`` returns
    ``name`` from the pooled table's "all" row, ``average_recall`` (the default ``headline``)
    pooled, or the case mean of a voxel metric, as a scalar tensor; ``summary()`` gives them all.
    """

    names: tuple[str, ...] = (
        *_VOXEL,
        "f3",
        *_LESION,
        "average_recall",
        *(f"{c}_{b}" for b in bracket_labels(BRACKETS) for c in _PER_BRACKET),
    )

    def __init__(
        self,
        threshold: float = 0.5,
        smooth: float = 2.0,
        beta: float = 3.0,
        ignore_index: int | None = None,
        detection: float = 0.6,
        brackets: Sequence[float] = BRACKETS,
        connectivity: int | None = None,
        relevant_from: float = 10,
        headline: str = "average_recall",
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
        self.relevant_from = relevant_from
        self.headline = headline
        self.voxel_names = (*_VOXEL, _fbeta_name(beta))
        self.names = (
            *self.voxel_names,
            *_LESION,
            "average_recall",
            *(f"{c}_{b}" for b in self.labels for c in _PER_BRACKET),
        )

    def _row(self, p: np.ndarray, r: np.ndarray) -> list[float]:
        tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
        voxel = _voxel_scores(torch.tensor([tp, fp, fn]), self.smooth, self.beta).tolist()
        sums = _lesion_sums(p, r, self.brackets, self.detection, self.connectivity, self.smooth)
        table = _table_from_sums(sums, self.labels)
        per_bracket = [table[b][c] for b in self.labels for c in _PER_BRACKET]
        case_recall = average_recall(table, self.brackets, self.relevant_from)
        return [*voxel, *(table["all"][c] for c in _LESION), case_recall, *per_bracket]

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> torch.Tensor:
        p, r = _case_masks(y_pred, y, ignore, self.ignore_index, self.threshold)
        p_np, r_np = p[:, 0].cpu().numpy(), r[:, 0].cpu().numpy()
        rows = [self._row(pi, ri) for pi, ri in zip(p_np, r_np, strict=True)]
        return torch.tensor(rows, dtype=torch.float32, device=y_pred.device)

    def _rows(self) -> np.ndarray:
        buffer = self.get_buffer()
        if buffer is None or len(buffer) == 0:
            return np.zeros((0, len(self.names)))
        return torch.as_tensor(buffer, dtype=torch.float64).reshape(-1, len(self.names)).cpu().numpy()

    def table(self) -> dict[str, dict[str, float]]:
        """The lesion table pooled over all cases so far (format of :func:`lesion_table`)."""
        rows = self._rows()
        column = {name: i for i, name in enumerate(self.names)}
        sums = np.zeros((len(self.labels), 6))
        for i, b in enumerate(self.labels):
            n_ref = rows[:, column[f"n_ref_{b}"]]
            sums[i, :5] = [rows[:, column[f"{c}_{b}"]].sum() for c in ("n_ref", "n_pred", "tp", "fn", "fp")]
            sums[i, 5] = (rows[:, column[f"avg_recall_{b}"]] * n_ref).sum()
        return _table_from_sums(sums, self.labels)

    def summary(self) -> dict[str, float]:
        """Voxel metrics averaged over cases; lesion counts and rates pooled (``table()``)."""
        rows = self._rows()
        out = {
            name: float(rows[:, i].mean()) if len(rows) else math.nan
            for i, name in enumerate(self.voxel_names)
        }
        table = self.table()
        out.update(table["all"])
        out["average_recall"] = average_recall(table, self.brackets, self.relevant_from)
        return out

    def aggregate(self, name: str | None = None) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor(self.summary()[name or self.headline])


class LesionTableWriter:
    """Write the pooled lesion-wise table of a ``medseg_monai.metrics.LesionMetrics`` handler at each
    evaluator epoch end: ``<prefix>lesion_table.csv`` (per size bracket TP/FN/FP, lesion precision
    and recall, average recall) and ``<prefix>lesion_brackets.png`` (detected and missed reference
    lesions and false positives per bracket, as the WMH thesis's fig. 8.24)."""

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
