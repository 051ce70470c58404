"""Training-loop handlers: gradient clipping and learning-rate scheduler stepping."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipping", "SchedulerStepper"]


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
