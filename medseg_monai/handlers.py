"""Ignite handlers the bundles attach (in ``train#handlers`` / ``validate#handlers``).

- :class:`GradientClipping`: clip by norm between backward and optimiser step (AMP-aware).
- :class:`CaseMetrics`: per-case and mean metrics with class names, the ``metrics.json`` contract.
- :class:`MLflowTracker`: one tagged MLflow run per training (or evaluation), per-epoch curves,
  artifacts, FINISHED or FAILED.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import ExitStack
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from medseg_monai.io import write_json
from medseg_monai.tracking import record_tags, start_run, tracking_uri

__all__ = [
    "CaseMetrics",
    "GradientClipping",
    "LesionTableWriter",
    "MLflowTracker",
    "SchedulerStepper",
    "config_params",
    "summarise_cases",
]

logger = logging.getLogger(__name__)


class GradientClipping:
    """Clip the gradient norm of ``engine.network`` after backward, before the optimiser step.

    With AMP the gradients are unscaled first, so ``max_norm`` is in true gradient units.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = max_norm
        self.norm_type = norm_type

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm, self.norm_type)


class SchedulerStepper:
    """Step a learning-rate scheduler: ``ReduceLROnPlateau`` after every validation run, with the
    evaluator's key metric (so it follows validation however often that runs, and the scheduler's
    ``mode`` says whether higher or lower is better); any other scheduler after every iteration (a
    per-step schedule such as Keras's time-based ``decay``), or every epoch with ``epoch_level=True``.
    """

    def __init__(self, lr_scheduler: Any, evaluator: Engine | None = None, epoch_level: bool = False) -> None:
        self.lr_scheduler = lr_scheduler
        self.evaluator = evaluator
        self.epoch_level = epoch_level
        self.plateau = isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.plateau and evaluator is None:
            raise ValueError("ReduceLROnPlateau needs the evaluator whose key metric it follows")

    def attach(self, engine: Engine) -> None:
        if self.plateau:
            self.evaluator.add_event_handler(Events.COMPLETED, self._step_on_metric)
        else:
            engine.add_event_handler(
                Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED, self
            )

    def _step_on_metric(self, evaluator: Engine) -> None:
        self.lr_scheduler.step(float(evaluator.state.metrics[evaluator.state.key_metric_name]))

    def __call__(self, engine: Engine) -> None:
        self.lr_scheduler.step()


def _case_id(item: Any) -> str:
    if isinstance(item, dict) and "case_id" in item:
        cid = item["case_id"]
        return str(cid[0] if isinstance(cid, (list, tuple)) else cid)
    meta = getattr(item.get("image"), "meta", {}) if isinstance(item, dict) else {}
    return Path(str(meta.get("filename_or_obj", "case"))).name


def summarise_cases(
    details: dict[str, torch.Tensor],
    case_ids: list[str],
    class_names: list[str],
    columns: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-case metric tables -> ``{"mean": {...}, "cases": {id: {...}}}``.

    ``details[name]`` is (N cases, K) with one column per class in ``class_names`` (or K = 1 for a
    case-level metric). Each case gets ``<name>_<class>`` and ``<name>`` (mean over its classes);
    ``mean`` averages cases, skipping NaN (a class absent from both reference and prediction).
    A metric named in ``columns`` has its own column names instead (e.g. the many columns of
    ``medseg_monai.metrics.LesionMetrics``), reported as they are.
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
    keys = list(dict.fromkeys(k for c in cases.values() for k in c))
    mean = {}
    for k in keys:
        values = [c[k] for c in cases.values() if k in c and not math.isnan(c[k])]
        mean[k] = sum(values) / len(values) if values else math.nan
    return {"mean": mean, "cases": cases}


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
    """

    def __init__(
        self,
        metrics: dict[str, str],
        class_names: list[str],
        output_path: str | None = None,
        columns: dict[str, list[str]] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.metrics = dict(metrics)
        self.class_names = list(class_names)
        self.output_path = output_path
        self.columns = {k: list(v) for k, v in (columns or {}).items()}
        self.aliases = dict(aliases or {})
        self._ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._ids.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summarise)

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        if isinstance(batch, dict):  # not decollated: one list of ids per key
            ids = batch.get("case_id")
            self._ids.extend(str(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))
        else:
            self._ids.extend(_case_id(item) for item in batch)

    def _summarise(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # metric details are gathered across ranks in rank order; gather the ids the same way
            gathered: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, self._ids)
            self._ids = [cid for ids in gathered for cid in ids]
        details = getattr(engine.state, "metric_details", {})
        missing = [m for m in self.metrics if m not in details]
        if missing:
            raise RuntimeError(f"metrics {missing} have no per-case details: set save_details=True on them")
        summary = summarise_cases(
            {self.metrics[m]: details[m] for m in self.metrics}, self._ids, self.class_names, self.columns
        )
        for values in (summary["mean"], *summary["cases"].values()):
            values.update({alias: values[name] for name, alias in self.aliases.items() if name in values})
        engine.state.case_metrics = summary
        if self.output_path:
            write_json(summary, self.output_path)


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


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_RECORDED_SECTIONS = ("network_def", "loss", "optimizer", "lr_scheduler")
_WORKFLOW_KEYS = ("imports", "initialize", "run", "finalize", "_meta_")


def config_params(config: dict[str, Any]) -> dict[str, Any]:
    """MLflow params of a merged bundle config: its top-level scalar and flat-list settings and its
    network, loss, optimiser and scheduler definitions (as written)."""
    params: dict[str, Any] = {}
    for key, value in config.items():
        if key in _WORKFLOW_KEYS:
            continue
        scalar = isinstance(value, (str, int, float, bool)) or value is None
        if scalar or (isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)):
            params[key] = value
    params.update({k: config[k] for k in _RECORDED_SECTIONS if isinstance(config.get(k), dict)})
    return params


class MLflowTracker:
    """Own the MLflow run of a training or evaluation engine (see ``medseg_monai.tracking``).

    On the engine's start it reads the run record in ``record_dir`` (``run.json``, written by
    ``medseg_monai.bundle.prepare_run``: commit, dataset id, content hash and kind, profile, device,
    versions) for the run's tags, and logs as params the settings of the run's ``config.json`` plus
    ``params``. Each epoch it logs the mean training loss and the learning rate; each epoch of
    ``evaluator`` (if given) its scalar metrics and the means of its ``case_metrics``, at the training
    epoch as step. On completion it logs the files of ``record_dir`` matching ``artifacts`` and ends the
    run FINISHED; an exception ends it FAILED and propagates. The run id is written to
    ``<record_dir>/mlflow_run.json``; with ``resume=True`` (evaluation) the run recorded there is
    continued instead of a new one being opened.

    Attach it before other handlers that re-raise exceptions (e.g. ``StatsHandler``), so that a
    failure is always recorded.
    """

    def __init__(
        self,
        experiment: str,
        run_name: str,
        record_dir: str,
        params: dict[str, Any] | None = None,
        evaluator: Engine | None = None,
        artifacts: tuple[str, ...] | list[str] = ("*.json", "*.yaml", "*.csv", "*.png", "*.log"),
        tags: dict[str, str] | None = None,
        metric_prefix: str = "",
        resume: bool = False,
        record_prefix: str = "",
    ) -> None:
        self.record_prefix = record_prefix
        self.experiment = experiment
        self.run_name = run_name
        self.output_dir = Path(record_dir)
        self.params = params or {}
        self.evaluator = evaluator
        self.artifacts = list(artifacts)
        self.tags = dict(tags or {})
        self.metric_prefix = metric_prefix
        self.resume = resume
        self._stack: ExitStack | None = None
        self._loss_sum = 0.0
        self._loss_n = 0
        self.run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._fail)
        if self.evaluator is not None and self.evaluator is not engine:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._log_evaluation)

    def _previous_run(self) -> str | None:
        record = self.output_dir / "mlflow_run.json"
        if not self.resume or not record.is_file():
            return None
        info = json.loads(record.read_text())
        return info["run_id"] if info.get("tracking_uri") == tracking_uri() else None

    def _open(self, engine: Engine) -> None:
        from medseg_monai.bundle import read_run_record

        record = read_run_record(self.output_dir, self.record_prefix)
        config_file = self.output_dir / f"{self.record_prefix}config.json"
        params = config_params(json.loads(config_file.read_text())) if config_file.is_file() else {}
        tags = {
            **record_tags(record),
            "output_dir": str(self.output_dir),
            "study": record["study"],
            "variant": record["experiment"],
            "seed": str(record["seed"]),
            **self.tags,
        }
        self._stack = ExitStack()
        run = self._stack.enter_context(
            start_run(
                self.experiment,
                self.run_name,
                tags=tags,
                params={**params, **self.params},
                run_id=self._previous_run(),
            )
        )
        self.run_id = run.info.run_id
        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.run_id, "experiment": self.experiment, "tracking_uri": tracking_uri()}
        write_json(record, self.output_dir / "mlflow_run.json")
        logger.info(
            "MLflow run %s (%s / %s) at %s", self.run_id, self.experiment, self.run_name, tracking_uri()
        )

    def _accumulate(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for item in items:
            loss = item.get("loss") if isinstance(item, dict) else None
            if loss is not None:
                self._loss_sum += float(loss)
                self._loss_n += 1
                break  # decollated outputs repeat the batch loss

    def _log_epoch(self, engine: Engine) -> None:
        import mlflow

        step = engine.state.epoch
        metrics = {}
        if self._loss_n:
            metrics["train_loss"] = self._loss_sum / self._loss_n
        self._loss_sum, self._loss_n = 0.0, 0
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            metrics["lr"] = float(optimizer.param_groups[0]["lr"])
        if self.evaluator is None or self.evaluator is engine:
            metrics.update(self._engine_metrics(engine))
        if metrics:
            mlflow.log_metrics(metrics, step=step)

    def _engine_metrics(self, engine: Engine) -> dict[str, float]:
        """The engine's scalar metrics and its case summary means, named ``<prefix><name>``; the
        bundles' ``val_`` handler names lose that part first (``val_loss`` -> ``<prefix>loss``)."""
        values = {k.removeprefix("val_"): _scalar(v) for k, v in engine.state.metrics.items()}
        summary = getattr(engine.state, "case_metrics", None)
        if summary:
            values.update(summary["mean"])
        p = self.metric_prefix
        return {p + k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}

    def _log_evaluation(self, evaluator: Engine) -> None:
        import mlflow

        if self.run_id is None:
            return
        step = self._engine.state.epoch if self._engine.state.epoch else evaluator.state.epoch
        mlflow.log_metrics(self._engine_metrics(evaluator), step=step)

    def _log_artifacts(self) -> None:
        import mlflow

        for path in sorted(self.output_dir.rglob("*")):
            rel = path.relative_to(self.output_dir)
            if path.is_file() and any(fnmatch(path.name, pattern) for pattern in self.artifacts):
                mlflow.log_artifact(
                    str(path), artifact_path=str(rel.parent) if rel.parent != Path(".") else None
                )

    def _close(self, engine: Engine) -> None:
        if self._stack is None:
            return
        try:
            self._log_artifacts()
        except BaseException as e:
            self._fail(engine, e)
        stack, self._stack = self._stack, None
        stack.close()

    def _fail(self, engine: Engine, e: BaseException) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            try:
                stack.__exit__(type(e), e, e.__traceback__)
            except BaseException as inner:
                if inner is not e:
                    logger.error("could not mark MLflow run %s as FAILED: %s", self.run_id, inner)
        raise e
