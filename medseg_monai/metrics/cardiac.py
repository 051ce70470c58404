"""Figures cardiac MR researchers read beside Dice: the 95th-percentile Hausdorff distance of each
structure and the ejection fractions of a patient's end-diastolic and end-systolic frames.

ACDC's papers (Bernard et al., IEEE TMI 37(11), 2018, table II onwards) report per structure and
phase Dice and Hausdorff distance, and the clinical indices from the ED and ES segmentations:
LV and RV ejection fraction, EF = (EDV - ESV) / EDV, compared with the reference by the mean
absolute error and the correlation over patients. A ratio of two volumes on one grid needs no
voxel size: EF from voxel counts equals EF from millilitres whenever both frames share their
voxel size, as a cine series' frames do. So both figures here work in voxels, and no volume or
distance in mm or ml is ever reported from files whose voxel size is unknown (the shared ACDC
samples' affine is the identity).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import HausdorffDistanceMetric
from monai.utils import MetricReduction

__all__ = ["EjectionFractions", "SurfaceDistance95Metric", "ejection_fraction", "ejection_fraction_summary"]


class SurfaceDistance95Metric(HausdorffDistanceMetric):
    """The symmetric 95th-percentile Hausdorff distance of each foreground class, in voxels.

    MONAI's :class:`~monai.metrics.HausdorffDistanceMetric` (``percentile=95``, unit spacing, so
    a step between slices counts as one voxel like a step in plane) gives NaN whenever the
    prediction or the reference of a class is empty, so a model that misses a whole structure
    would drop out of the mean instead of scoring worst. Here a class present in exactly one of
    the two scores the diagonal of the volume in voxels, the largest distance the grid holds; a
    class absent from both stays NaN (no boundary to compare: left out of means).

    Inputs are one-hot ``(B, C, *spatial)`` predictions and references; the result is
    ``(B, C - 1)`` (background excluded).
    """

    def __init__(
        self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False
    ) -> None:
        super().__init__(
            include_background=False, percentile=95, reduction=reduction, get_not_nans=get_not_nans
        )

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        distance = super()._compute_tensor(y_pred, y, **kwargs)
        pred_any = y_pred[:, 1:].flatten(2).bool().any(-1).to(distance.device)
        ref_any = y[:, 1:].flatten(2).bool().any(-1).to(distance.device)
        diagonal = math.sqrt(sum((s - 1) ** 2 for s in y.shape[2:]))
        return torch.where(pred_any ^ ref_any, torch.full_like(distance, diagonal), distance)


def ejection_fraction(edv: float, esv: float) -> float:
    """EF in percent, 100 (EDV - ESV) / EDV, from volumes in any one unit (voxel counts here);
    NaN when the end-diastolic volume is 0 (nothing to eject from)."""
    return 100.0 * (edv - esv) / edv if edv > 0 else math.nan


def ejection_fraction_summary(
    rows: Sequence[Mapping[str, float]], cavities: Sequence[str]
) -> dict[str, float]:
    """Agreement of predicted with reference EF over patients, per cavity ``c``: ``ef_<c>_mae``
    (mean absolute error, EF points), ``ef_<c>_bias`` (mean of predicted - reference) and
    ``ef_<c>_corr`` (Pearson's r; NaN for fewer than 3 patients or a constant column), from rows
    holding ``ef_<c>`` and ``ef_<c>_ref``. Patients whose EF is NaN on either side are left out."""
    out: dict[str, float] = {}
    for c in cavities:
        pairs = np.array(
            [
                (r[f"ef_{c}"], r[f"ef_{c}_ref"])
                for r in rows
                if not any(map(math.isnan, (r[f"ef_{c}"], r[f"ef_{c}_ref"])))
            ],
            dtype=np.float64,
        ).reshape(-1, 2)
        error = pairs[:, 0] - pairs[:, 1]
        out[f"ef_{c}_mae"] = float(np.abs(error).mean()) if len(pairs) else math.nan
        out[f"ef_{c}_bias"] = float(error.mean()) if len(pairs) else math.nan
        constant = len(pairs) and (np.ptp(pairs[:, 0]) == 0 or np.ptp(pairs[:, 1]) == 0)
        out[f"ef_{c}_corr"] = (
            float(np.corrcoef(pairs.T)[0, 1]) if len(pairs) >= 3 and not constant else math.nan
        )
    return out


class EjectionFractions:
    """Each patient's LV (and RV) ejection fraction from the evaluated ED and ES frames, predicted
    and reference, for an evaluator whose data dicts carry ``case_id``, ``group`` (the patient) and
    ``phase`` (``ED`` / ``ES``, from the registry's ``phases``; cases without one are skipped).

    At each iteration it counts the voxels of each cavity in the post-processed one-hot ``pred``
    and ``label`` (C, *spatial) of every case; at the epoch's end it pairs each patient's ED and ES
    frames and writes a CSV with one row per patient (``output_path``): the cavity voxel counts,
    ``ef_<c>``, ``ef_<c>_ref`` and ``ef_<c>_error`` (predicted - reference, EF points).
    :meth:`summary` gives :func:`ejection_fraction_summary` for :class:`CaseMetrics`' ``mean``, and
    :meth:`sections` the per-patient rows for ``metrics.json``'s ``patients``.

    Args:
        class_names: the classes of the one-hot channels, background first (e.g. ``background,
            rv_cavity, myocardium, lv_cavity``).
        cavities: short name -> class name of each cavity whose EF is reported; a cavity whose
            class the model does not segment is skipped (the paper's LV class set has no RV).
        output_path: the CSV to write, or None.
    """

    phases = ("ED", "ES")

    def __init__(
        self,
        class_names: Sequence[str],
        cavities: Mapping[str, str] | None = None,
        output_path: str | None = None,
    ) -> None:
        cavities = dict(cavities or {"lv": "lv_cavity", "rv": "rv_cavity"})
        self.channels = {c: list(class_names).index(n) for c, n in cavities.items() if n in class_names}
        self.output_path = output_path
        self._counts: dict[str, dict[str, dict[str, float]]] = {}
        self._gathered = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._counts.clear()
        self._gathered = False

    def _gather(self) -> None:
        """Under DDP each rank saw some frames: merge every rank's counts once per epoch (the
        first call of :meth:`rows` after the epoch, made on every rank by CaseMetrics)."""
        if self._gathered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        parts: list[dict[str, dict[str, dict[str, float]]]] = [
            {} for _ in range(torch.distributed.get_world_size())
        ]
        torch.distributed.all_gather_object(parts, self._counts)
        self._counts = {}
        for part in parts:
            for patient, frames in part.items():
                self._counts.setdefault(patient, {}).update(frames)
        self._gathered = True

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for item, out in zip(batch, output, strict=True):  # decollated: one dict per case
            phase = item.get("phase")
            if phase not in self.phases:
                continue  # a dataset whose registry names no phases has no ejection fraction
            counts = self._counts.setdefault(str(item["group"]), {})
            if phase in counts:
                raise ValueError(
                    f"patient {item['group']!r} has two {phase} frames among the evaluated cases"
                )
            counts[phase] = {
                f"{key}_{c}": float(out[key][ch].sum())
                for key in ("pred", "label")
                for c, ch in self.channels.items()
            }

    def rows(self) -> dict[str, dict[str, float]]:
        """Per patient with both frames: voxel counts and predicted / reference EF per cavity."""
        self._gather()
        rows: dict[str, dict[str, float]] = {}
        for patient, frames in sorted(self._counts.items()):
            if set(frames) != set(self.phases):
                continue  # a split holds both frames of a patient; a lone frame has no EF
            row: dict[str, float] = {}
            for c in self.channels:
                ed_p, es_p = frames["ED"][f"pred_{c}"], frames["ES"][f"pred_{c}"]
                ed_r, es_r = frames["ED"][f"label_{c}"], frames["ES"][f"label_{c}"]
                row.update(
                    {
                        f"edv_{c}_voxels": ed_p,
                        f"esv_{c}_voxels": es_p,
                        f"edv_{c}_voxels_ref": ed_r,
                        f"esv_{c}_voxels_ref": es_r,
                        f"ef_{c}": ejection_fraction(ed_p, es_p),
                        f"ef_{c}_ref": ejection_fraction(ed_r, es_r),
                    }
                )
                row[f"ef_{c}_error"] = row[f"ef_{c}"] - row[f"ef_{c}_ref"]
            rows[patient] = row
        return rows

    def summary(self) -> dict[str, float]:
        return ejection_fraction_summary(list(self.rows().values()), list(self.channels))

    def sections(self) -> dict[str, Any]:
        return {"patients": self.rows()}

    def _write(self, engine: Engine) -> None:
        rows = self.rows()  # on every rank: under DDP it gathers the counts
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not self.output_path or (distributed and torch.distributed.get_rank() != 0):
            return
        columns = list(next(iter(rows.values()), {}))
        Path(self.output_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["patient", *columns])
            for patient, row in rows.items():
                writer.writerow([patient, *(f"{row[c]:.4f}" for c in columns)])
