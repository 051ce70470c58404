"""Per-case metrics with class names: the ``metrics.json`` contract of evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from medseg_monai.io import write_json

__all__ = ["CaseMetrics", "summarise_cases"]


def _case_id(item: Any) -> str:
    if isinstance(item, dict) and "case_id" in item:
        cid = item["case_id"]
        return str(cid[0] if isinstance(cid, (list, tuple)) else cid)
    meta = getattr(item.get("image"), "meta", {}) if isinstance(item, dict) else {}
    return Path(str(meta.get("filename_or_obj", "case"))).name


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _nan_means(cases: list[dict[str, float]]) -> dict[str, float]:
    """The mean of every key over ``cases``, skipping NaN (NaN where no case has a value)."""
    mean = {}
    for k in dict.fromkeys(k for c in cases for k in c):
        values = [c[k] for c in cases if k in c and not math.isnan(c[k])]
        mean[k] = sum(values) / len(values) if values else math.nan
    return mean


def summarise_cases(
    details: dict[str, torch.Tensor],
    case_ids: list[str],
    class_names: list[str],
    columns: dict[str, list[str]] | None = None,
    groups: dict[str, str] | None = None,
    group_name: str = "group",
) -> dict[str, dict[str, Any]]:
    """Per-case metric tables -> ``{"mean": {...}, "cases": {id: {...}}}``.

    ``details[name]`` is (N cases, K) with one column per class in ``class_names`` (or K = 1 for a
    case-level metric). Each case gets ``<name>_<class>`` and ``<name>`` (mean over its classes);
    ``mean`` averages cases, skipping NaN (a class absent from both reference and prediction).
    A metric named in ``columns`` has its own column names instead (e.g. the many columns of
    ``medseg_monai.metrics.LesionMetrics``), reported as they are. With ``groups`` (case id ->
    group, e.g. its cardiac phase ED or ES) the summary also has ``by_<group_name>``: the same
    means over each group's cases.
    """
    cases: dict[str, dict[str, float]] = {cid: {} for cid in case_ids}
    columns = columns or {}
    for name, table in details.items():
        table = torch.as_tensor(table, dtype=torch.float64).reshape(len(case_ids), -1)
        if name in columns:
            for row, cid in zip(table, case_ids, strict=True):
                cases[cid].update({c: float(v) for c, v in zip(columns[name], row, strict=True)})
            continue
        if table.shape[1] > 1 and table.shape[1] != len(class_names):
            raise ValueError(f"metric '{name}' has {table.shape[1]} columns for classes {class_names}")
        for row, cid in zip(table, case_ids, strict=True):
            if table.shape[1] > 1:
                cases[cid].update({f"{name}_{c}": float(v) for c, v in zip(class_names, row, strict=True)})
            cases[cid][name] = float(torch.nanmean(row)) if not torch.isnan(row).all() else math.nan
    summary: dict[str, dict[str, Any]] = {"mean": _nan_means(list(cases.values())), "cases": cases}
    if groups:
        names = sorted(set(groups.values()))
        summary[f"by_{group_name}"] = {
            g: _nan_means([cases[c] for c in case_ids if groups.get(c) == g]) for g in names
        }
    return summary


class CaseMetrics:
    """Collect the case ids an evaluator sees and turn its metrics' per-case details
    (``save_details=True`` metric handlers) into :func:`summarise_cases` form.

    The summary is stored as ``engine.state.case_metrics`` at each epoch end and, when
    ``output_path`` is given, written there as JSON (the evaluate contract's ``metrics.json``).

    Args:
        metrics: metric handler name -> reported name, e.g. ``{"val_dice": "dice", "val_iou": "iou"}``.
        class_names: the classes of the metric columns (background excluded when the metrics exclude it).
        columns: reported name -> column names, for metrics whose columns are not classes.
        aliases: extra names for reported values, e.g. ``{"dice": "dice_wmh"}`` for a one-class study.
        summaries: metrics (or their handlers) with a ``summary()`` of data-set figures that are
            not means over cases (e.g. lesion counts pooled over cases, the WMH thesis's mean over
            mini-batches); they replace the case means of the same name in ``mean``. One with a
            ``sections()`` adds its tables beside ``mean`` and ``cases`` (e.g. ``patients``: the
            ejection fractions of :class:`~medseg_monai.metrics.EjectionFractions`).
        group_by: a data-dict key whose value groups the cases (e.g. ``phase``: ED, ES); the
            summary's ``by_<group_by>`` (``by_phase``) holds each group's means. Cases without
            it are in no group.
    """

    def __init__(
        self,
        metrics: dict[str, str],
        class_names: list[str],
        output_path: str | None = None,
        columns: dict[str, list[str]] | None = None,
        aliases: dict[str, str] | None = None,
        summaries: list[Any] | None = None,
        group_by: str | None = None,
    ) -> None:
        self.metrics = dict(metrics)
        self.class_names = list(class_names)
        self.output_path = output_path
        self.columns = {k: list(v) for k, v in (columns or {}).items()}
        self.aliases = dict(aliases or {})
        self.summaries = [getattr(m, "metric_fn", m) for m in summaries or []]
        self.group_by = group_by
        self._ids: list[str] = []
        self._groups: dict[str, str] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: (self._ids.clear(), self._groups.clear()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summarise)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        if isinstance(batch, dict):  # not decollated: one list per key
            ids = [str(i) for i in _as_list(batch.get("case_id"))]
            groups = _as_list(batch.get(self.group_by)) if self.group_by else []
            pairs = list(zip(ids, groups + [None] * (len(ids) - len(groups)), strict=True))
        else:
            pairs = [(_case_id(item), item.get(self.group_by) if self.group_by else None) for item in batch]
        for cid, group in pairs:
            self._ids.append(cid)
            if group is not None:
                self._groups[cid] = str(group)

    def _summarise(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # metric details are gathered across ranks in rank order; gather the ids the same way
            gathered: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, self._ids)
            self._ids = [cid for ids in gathered for cid in ids]
            groups: list[dict[str, str]] = [{} for _ in gathered]
            torch.distributed.all_gather_object(groups, self._groups)
            self._groups = {cid: g for part in groups for cid, g in part.items()}
        details = getattr(engine.state, "metric_details", {})
        missing = [m for m in self.metrics if m not in details]
        if missing:
            raise RuntimeError(f"metrics {missing} have no per-case details: set save_details=True on them")
        summary = summarise_cases(
            {self.metrics[m]: details[m] for m in self.metrics},
            self._ids,
            self.class_names,
            self.columns,
            self._groups if self.group_by else None,
            self.group_by or "group",
        )
        for metric in self.summaries:
            summary["mean"].update(metric.summary())
            if hasattr(metric, "sections"):
                summary.update(metric.sections())
        for values in (summary["mean"], *summary["cases"].values()):
            values.update({alias: values[name] for name, alias in self.aliases.items() if name in values})
        engine.state.case_metrics = summary
        if self.output_path:
            write_json(summary, self.output_path)
