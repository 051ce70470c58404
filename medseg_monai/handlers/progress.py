"""What a person watching a training sees: an estimate of the run's length early on, and one line
per epoch with the training loss, the study's headline metrics, the learning rate and the ETA."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from ignite.engine import Engine, Events

__all__ = ["ProgressLog", "evaluation_values", "format_duration", "iteration_loss"]

logger = logging.getLogger("medseg_monai.progress")


def format_duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def iteration_loss(output: Any) -> float | None:
    """The batch loss of a trainer's iteration output (a dict, or decollated dicts that repeat it)."""
    for item in output if isinstance(output, list) else [output]:
        loss = item.get("loss") if isinstance(item, dict) else None
        if loss is not None:
            return float(torch.as_tensor(loss).detach().float().mean())
    return None


def evaluation_values(engine: Engine) -> dict[str, float]:
    """An evaluator's scalar metrics and the means of its per-case summary (which win on a name
    clash), the bundles' ``val_`` metric names without that part (``val_loss`` -> ``loss``); NaNs
    (a class absent everywhere) and non-scalars left out."""
    values: dict[str, Any] = {k.removeprefix("val_"): v for k, v in engine.state.metrics.items()}
    summary = getattr(engine.state, "case_metrics", None)
    if summary:
        values.update(summary["mean"])
    out = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            value = float(value) if value.numel() == 1 else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value)):
            out[name] = float(value)
    return out


class ProgressLog:
    """Log the run's expected length after ``estimate_after`` iterations (time per iteration times
    the iterations left; validation comes on top), then, every epoch, ``epoch k/N: train_loss ..
    | <metric> .. | lr .. | <time> per epoch, ETA ..`` with the ``headline`` metrics of ``evaluator``
    (its per-case summary means, else its metrics; e.g. ``[dice, f3]``)."""

    rank0_only: ClassVar[bool] = True  # one log: rank 0 logs (runtime.for_this_rank)

    def __init__(
        self, evaluator: Engine | None = None, headline: Sequence[str] = (), estimate_after: int = 5
    ) -> None:
        self.evaluator = evaluator
        self.headline = list(headline)
        self.estimate_after = estimate_after
        self._loss_sum = 0.0
        self._loss_n = 0
        self._first_epoch: int | None = None
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._first_epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Engine) -> None:
        self._first_epoch = None
        self._estimated = False

    def _first_epoch_started(self, engine: Engine) -> None:
        # here, not at STARTED: a resume handler attached after this one restores the epoch
        # counter in its own STARTED handler, and the rates count only this process's epochs
        if self._first_epoch is None:
            self._start = time.perf_counter()
            self._first_epoch = engine.state.epoch - 1  # > 0 when a run is resumed

    def _iteration(self, engine: Engine) -> None:
        loss = iteration_loss(engine.state.output)
        if loss is not None:
            self._loss_sum += loss
            self._loss_n += 1
        done = engine.state.iteration - (self._first_epoch or 0) * (engine.state.epoch_length or 0)
        if not self._estimated and done >= self.estimate_after and engine.state.epoch_length:
            self._estimated = True
            per_iteration = (time.perf_counter() - self._start) / done
            left = engine.state.max_epochs * engine.state.epoch_length - engine.state.iteration
            logger.info(
                "about %s for the %d epochs left (%.2f s per iteration, %d per epoch; validation not included)",
                format_duration(per_iteration * left),
                engine.state.max_epochs - engine.state.epoch + 1,
                per_iteration,
                engine.state.epoch_length,
            )

    def _headline(self) -> str:
        values = evaluation_values(self.evaluator) if self.evaluator is not None else {}
        shown = [f"{name} {values[name]:.4f}" for name in self.headline if name in values]
        return " | val " + ", ".join(shown) if shown else ""

    def _epoch(self, engine: Engine) -> None:
        loss = f"train_loss {self._loss_sum / self._loss_n:.4f}" if self._loss_n else "train_loss -"
        self._loss_sum, self._loss_n = 0.0, 0
        optimizer = getattr(engine, "optimizer", None)
        lr = f" | lr {optimizer.param_groups[0]['lr']:.3g}" if optimizer is not None else ""
        epochs_done = engine.state.epoch - (self._first_epoch or 0)
        per_epoch = (time.perf_counter() - self._start) / max(epochs_done, 1)
        eta = per_epoch * (engine.state.max_epochs - engine.state.epoch)
        logger.info(
            "epoch %d/%d: %s%s%s | %s per epoch, ETA %s",
            engine.state.epoch,
            engine.state.max_epochs,
            loss,
            self._headline(),
            lr,
            format_duration(per_epoch),
            format_duration(eta),
        )
