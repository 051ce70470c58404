"""The MLflow run of a training or evaluation engine, tagged from the run record."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from contextlib import ExitStack
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ignite.engine import Engine, Events

if TYPE_CHECKING:
    import torch

from medseg_monai.errors import redact
from medseg_monai.handlers.progress import evaluation_values, iteration_loss
from medseg_monai.mlflow_assets import (
    log_best_model,
    log_training_data,
    resolved_params,
    system_metrics_wanted,
)
from medseg_monai.record import read_run_record
from medseg_monai.tracking import (
    OFFLINE_RECORD,
    journal,
    open_client,
    record_run,
    record_tags,
    recorded_run,
    server_answers,
    start_run,
    tracking_uri,
)

__all__ = ["MLflowTracker", "config_params"]

logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "MEDSEG_MLFLOW_PARENT_RUN_ID"  # set: the run is a child of that run (nested in the UI)


_RECORDED_SECTIONS = ("network_def", "loss", "optimizer", "lr_scheduler")
_WORKFLOW_KEYS = ("imports", "initialize", "run", "finalize", "_meta_")


def _plain(value: Any) -> bool:
    """A value MONAI takes as written: not an expression (``$``), reference (``@``) or macro (``%``)."""
    return not (isinstance(value, str) and value.startswith(("$", "@", "%")))


def _flat(value: Any) -> bool:
    scalar = isinstance(value, (str, int, float, bool)) or value is None
    flat_list = isinstance(value, list) and all(not isinstance(v, (dict, list)) and _plain(v) for v in value)
    return (scalar and _plain(value)) or flat_list


def config_params(config: dict[str, Any]) -> dict[str, Any]:
    """MLflow params of a merged bundle config: its top-level plain settings (text, numbers, flags,
    flat lists of them) and its network, loss, optimiser and scheduler definitions as written.
    Nothing is evaluated, so an expression, reference or macro is not a param: a ``config.json`` may
    come from a run folder someone else wrote, and logging must never run its code."""
    params = {k: v for k, v in config.items() if k not in _WORKFLOW_KEYS and _flat(v)}
    params.update({k: config[k] for k in _RECORDED_SECTIONS if isinstance(config.get(k), dict)})
    return params


class MLflowTracker:
    """Own the MLflow run of a training or evaluation engine (see ``medseg_monai.tracking``).

    On the engine's start it reads the run record in ``record_dir`` (``run.json``, written by
    ``medseg_monai.record.prepare_run``: commit, dataset id, content hash and kind, profile, device,
    versions) for the run's tags, and logs as params the settings of the run's ``config.json`` plus
    ``params``. Each epoch it logs the mean training loss and the learning rate; each epoch of
    ``evaluator`` (if given) its scalar metrics and the means of its ``case_metrics``, at the training
    epoch as step (several validations an epoch: see :meth:`_log_evaluation`). On completion it logs the files of ``record_dir`` matching ``artifacts`` and ends the
    run FINISHED, or KILLED when a signal stopped the engine; an exception ends it FAILED and
    propagates. The run id is written to ``<record_dir>/mlflow_run.json``; with ``resume=True`` (a
    resumed training) the run recorded there is continued. With ``log_only=True`` (evaluation) the
    metrics and files go into the recorded run without touching its status or params (a new run is
    opened only when none is recorded).

    When a tracking server stops answering mid-run (MLflow's client has retried for a while), the
    training goes on: the metrics, files and end status the server did not get are kept in
    ``<record_dir>/mlflow_offline.json``, and ``python -m medseg_monai.tracking upload <record_dir>``
    sends them once it is back (``medseg_monai.tracking.upload``).

    Attach it before other handlers that re-raise exceptions (e.g. ``StatsHandler``), so that a
    failure is always recorded.
    """

    rank0_only: ClassVar[bool] = True  # one MLflow run: rank 0 tracks (runtime.for_this_rank)

    def __init__(
        self,
        experiment: str,
        run_name: str,
        record_dir: str,
        params: dict[str, Any] | None = None,
        evaluator: Engine | None = None,
        artifacts: tuple[str, ...] | list[str] = ("*.json", "*.yaml", "*.csv", "*.png", "*.log", "model.pt"),
        tags: dict[str, str] | None = None,
        metric_prefix: str = "",
        resume: bool = False,
        record_prefix: str = "",
        log_only: bool = False,
        resolved: Mapping[str, Any] | None = None,
        network: torch.nn.Module | None = None,
        register: str | None = None,
    ) -> None:
        self.resolved = resolved
        self.network = network
        self.register = register
        self._input_example: torch.Tensor | None = None
        self._example_hook: Any = None
        self.model_uri: str | None = None
        self.record_prefix = record_prefix
        self.log_only = log_only
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
        self._iteration_series = False
        self.seconds = 0.0  # spent in MLflow calls (``medseg_monai.timing``)
        self.offline = False  # the server went away: what is left to send goes to the journal
        self._iterations = 0  # completed in this process
        self._status_before: str | None = None  # of a resumed run, when this process opened it

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._timed(self._open))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._timed(self._log_epoch))
        engine.add_event_handler(Events.COMPLETED, self._timed(self._close))
        engine.add_event_handler(Events.TERMINATE, self._on_terminate)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._fail)
        if self.evaluator is not None and self.evaluator is not engine:
            # untimed: it runs inside the validation, which is timed as a whole
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._log_evaluation)
        if self.network is not None and not self.log_only:
            self._example_hook = self.network.register_forward_pre_hook(self._keep_input_example)

    def _keep_input_example(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """The first input the network gets in eval mode (validation: a whole image, or a sliding
        window's patch), one sample on the CPU: the logged model's input example."""
        if module.training or not args or not hasattr(args[0], "detach"):
            return
        self._input_example = args[0][:1].detach().to("cpu").clone()
        self._example_hook.remove()

    def _timed(self, handler: Any) -> Any:
        """``handler`` adding its seconds to ``self.seconds`` (the job's ``mlflow`` phase)."""

        def timed(engine: Engine) -> None:
            start = time.perf_counter()
            try:
                handler(engine)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def _open(self, engine: Engine) -> None:
        self._client = open_client()
        recorded = recorded_run(self.output_dir)
        if self.log_only and recorded is not None:
            # evaluation of a tracked training: its metrics join that run, whose status stays as it is
            self.run_id = recorded
            logger.info("logging %s* metrics into MLflow run %s", self.metric_prefix, self.run_id)
            for key, value in self.tags.items():  # e.g. eval_test_train_overlap
                self._send(lambda k=key, v=value: self._client.set_tag(self.run_id, k, v), tags={key: value})
            return
        if self.resume and recorded is not None:
            self._status_before = self._client.get_run(recorded).info.status
        record = read_run_record(self.output_dir, self.record_prefix)
        config_file = self.output_dir / f"{self.record_prefix}config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        # with the running bundle's resolved values, settings as resolved; else as written
        params = (
            resolved_params(config, self.resolved) if self.resolved is not None else config_params(config)
        )
        tags = {
            **record_tags(record),
            "output_dir": str(self.output_dir),
            "study": record["study"],
            "variant": record["experiment"],
            "seed": str(record["seed"]),
            **self.tags,
        }
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:  # a trial of a hyperparameter search (medseg_monai.search): the search's child run
            tags.setdefault("mlflow.parentRunId", parent)
        self._stack = ExitStack()
        run = self._stack.enter_context(
            start_run(
                self.experiment,
                self.run_name,
                tags=tags,
                params={**params, **self.params},
                run_id=recorded if self.resume else None,
                log_system_metrics=system_metrics_wanted(),
            )
        )
        self.run_id = run.info.run_id
        if not self.log_only and not (self.resume and recorded):  # a resumed run has its input already
            log_training_data(record)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.log_only:
            record_run(self.output_dir, self.run_id, self.experiment)
        logger.info(
            "MLflow run %s (%s / %s) at %s",
            self.run_id,
            self.experiment,
            self.run_name,
            redact(tracking_uri()),
        )

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.run_id is None or not metrics:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._send(
            lambda: self._client.log_batch(self.run_id, metrics=items),
            metrics=[(m.key, m.value, m.timestamp, m.step) for m in items],
        )

    def _send(self, call: Any, **pending: Any) -> None:
        """``call()`` to the server; when it has gone (now or earlier), ``pending`` into the journal
        (``medseg_monai.tracking.journal``) instead."""
        if not self.offline:
            try:
                call()
                return
            except Exception as e:
                self._go_offline(e)
        journal(self.output_dir, self.run_id, **pending)

    def _go_offline(self, error: Exception) -> None:
        """The run's server stopped answering (MLflow's client has retried already): go on without
        it, keeping what it should have received in the run folder's journal. Anything else re-raises."""
        if server_answers(self._client.tracking_uri):
            raise error
        self.offline = True
        logger.warning(
            "the MLflow server %s went away (%s): the run goes on, its metrics and files stay in %s; "
            "when the server is back: python -m medseg_monai.tracking upload %s",
            redact(self._client.tracking_uri), redact(str(error).splitlines()[0][:200]),
            self.output_dir / OFFLINE_RECORD, self.output_dir,
        )  # fmt: skip

    def _accumulate(self, engine: Engine) -> None:
        self._iterations += 1
        loss = iteration_loss(engine.state.output)
        if loss is not None:
            self._loss_sum += loss
            self._loss_n += 1

    def _log_epoch(self, engine: Engine) -> None:
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
        self._log_metrics(metrics, step)

    def _engine_metrics(self, engine: Engine) -> dict[str, float]:
        """:func:`~medseg_monai.handlers.progress.evaluation_values`, named ``<prefix><name>``."""
        return {self.metric_prefix + k: v for k, v in evaluation_values(engine).items()}

    def _log_evaluation(self, evaluator: Engine) -> None:
        """An evaluation's metrics at the training epoch as step. With several validations an epoch
        (``medseg_monai.handlers.ValidationSchedule``) only the one that ends the epoch is logged so,
        and every one's key metric goes into ``<prefix><key>_by_iteration`` at the training
        iteration as step (from the first validation inside an epoch on)."""
        trainer = self._engine.state
        metrics = self._engine_metrics(evaluator)
        length = trainer.epoch_length
        inside_epoch = bool(trainer.iteration and length and trainer.iteration % length)
        self._iteration_series = self._iteration_series or inside_epoch
        key = getattr(evaluator.state, "key_metric_name", None)
        name = self.metric_prefix + key.removeprefix("val_") if key else None
        if self._iteration_series and name in metrics:
            self._log_metrics({f"{name}_by_iteration": metrics[name]}, trainer.iteration)
        if not inside_epoch:
            self._log_metrics(metrics, trainer.epoch if trainer.epoch else evaluator.state.epoch)

    def _log_artifacts(self) -> None:
        for path in sorted(self.output_dir.rglob("*")):
            rel = path.relative_to(self.output_dir)
            wanted = any(fnmatch(path.name, pattern) for pattern in self.artifacts)
            if path.is_file() and wanted and path.name != OFFLINE_RECORD:
                folder = str(rel.parent) if rel.parent != Path(".") else None
                self._send(
                    lambda p=path, f=folder: self._client.log_artifact(self.run_id, str(p), artifact_path=f),
                    artifacts=[(str(rel), folder)],
                )

    def _on_terminate(self, engine: Engine) -> None:
        # a signal skips COMPLETED; any other stop (e.g. early stopping) reaches it as usual
        if getattr(engine.state, "interrupted", None):
            self._close(engine)

    def _close(self, engine: Engine) -> None:
        """End of the engine's run: log the artifacts, then end an owned run FINISHED, or KILLED when
        a signal stopped it (``engine.state.interrupted``, set by ``TrainingCheckpoint``)."""
        import mlflow

        if self.run_id is None:
            return
        interrupted = getattr(engine.state, "interrupted", None)
        try:
            if not (interrupted and self.log_only):  # an interrupted evaluation's files are not results
                self._log_artifacts()
            if not (interrupted or self.offline or self.log_only or self._stack is None):
                self._log_model()  # a training that ended: its best checkpoint, while the run is open
        except BaseException as e:
            self._fail(engine, e)
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        status = "KILLED" if interrupted else "FINISHED"
        if self.offline:
            self._end_offline(status)
            return
        if status == "KILLED":
            mlflow.end_run(status="KILLED")
        stack.close()

    def _log_model(self) -> None:
        """The best checkpoint (``model.pt``) as the run's MLflow model, registered as ``register``
        when given (``medseg_monai.mlflow_assets.log_best_model``). A run without one (no
        validation, no network given) says so in the log; a model that MLflow cannot take ends
        the run FAILED like any other error of the tracker."""
        checkpoint = self.output_dir / "model.pt"
        if self.network is None:
            return
        if not checkpoint.is_file() or self._input_example is None:
            logger.warning(
                "no MLflow model for run %s: no validated best checkpoint %s", self.run_id, checkpoint
            )
            return
        info = log_best_model(self.network, checkpoint, self._input_example, self.register)
        self.model_uri = info.model_uri
        registered = f", registered as '{self.register}' version {info.registered_model_version}"
        logger.info(
            "MLflow model %s (%s)%s", info.model_uri, checkpoint.name, registered if self.register else ""
        )

    def _end_offline(self, status: str) -> None:
        """End the run with its server gone: ``status`` waits in the journal (the run ends when it is
        uploaded), and this process drops its active MLflow run without calling the server, which
        ``mlflow.end_run`` would retry for minutes."""
        from mlflow.tracking import fluent

        journal(self.output_dir, self.run_id, status=status)
        stack = fluent._active_run_stack.get()
        if stack:
            stack.pop()

    def _fail(self, engine: Engine, e: BaseException) -> None:
        if self._stack is not None and self.offline:
            self._stack = None
            self._end_offline("FAILED")
        if self._stack is not None:
            stack, self._stack = self._stack, None
            if self._status_before is not None and not self._iterations:
                # a resume that failed before training on (e.g. a checkpoint that does not load):
                # the run keeps the status it had (KILLED stays KILLED), never FAILED
                import mlflow

                mlflow.end_run(status=self._status_before)
                logger.warning("MLflow run %s left %s: the resume failed", self.run_id, self._status_before)
            try:
                stack.__exit__(type(e), e, e.__traceback__)
            except BaseException as inner:
                if inner is not e:
                    logger.error(
                        "could not mark MLflow run %s as FAILED: %s", self.run_id, redact(str(inner))
                    )
        raise e
