"""Training-loop handlers: gradient clipping, learning-rate scheduler stepping, how often
validation runs, early stopping, and stopping a training that diverged."""

from __future__ import annotations

import math
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.handlers import ValidationHandler

from medseg_monai.errors import InputError
from medseg_monai.handlers.progress import iteration_loss
from medseg_monai.runtime import first_non_finite

__all__ = [
    "EarlyStopping",
    "GradientClipping",
    "SchedulerStepper",
    "StopOnNonFiniteLoss",
    "ValidationSchedule",
    "validation_iterations",
]


def validation_iterations(epoch_length: int, per_epoch: int) -> list[int]:
    """The iterations of an epoch (1 .. ``epoch_length``) after which validation runs when it runs
    ``per_epoch`` times an epoch: evenly spaced, ``ceil(j * epoch_length / per_epoch)`` for
    j = 1 .. ``per_epoch``, so the last one ends the epoch; every iteration when the epoch is shorter."""
    if per_epoch < 1:
        raise ValueError(f"validations_per_epoch must be at least 1, got {per_epoch}")
    return sorted({math.ceil(j * epoch_length / per_epoch) for j in range(1, per_epoch + 1)})


class ValidationSchedule(ValidationHandler):
    """MONAI's ``ValidationHandler`` run ``per_epoch`` times in every ``interval``-th epoch.

    ``per_epoch=1`` is MONAI's epoch-level validation every ``interval`` epochs. With
    ``per_epoch=k > 1`` validation runs after the iterations :func:`validation_iterations` gives
    (k evenly spaced, the last at the epoch's end; every iteration when an epoch has fewer than k),
    as the X-ray poster's reference implementation (milesial/Pytorch-UNet, ``train.py``) evaluates
    every ``n_train // (5 * batch_size)`` steps, i.e. 5 times an epoch. A ``ReduceLROnPlateau``
    stepped by :class:`SchedulerStepper` then steps after each of them, and the best-model saver
    sees each; the one that ends the epoch is what per-epoch logs and checkpoints show.
    """

    def __init__(self, validator: Any, per_epoch: int = 1, interval: int = 1) -> None:
        super().__init__(interval=int(interval), validator=validator, epoch_level=True)
        self.per_epoch = int(per_epoch)
        validation_iterations(1, self.per_epoch)  # refuses per_epoch < 1 now, not mid-run

    def attach(self, engine: Engine) -> None:
        if self.per_epoch == 1:
            super().attach(engine)
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self._due), self)

    def _due(self, engine: Engine, iteration: int) -> bool:
        length = engine.state.epoch_length
        if not length or engine.state.epoch % self.interval:
            return False
        return (iteration - 1) % length + 1 in validation_iterations(length, self.per_epoch)


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


class EarlyStopping:
    """Stop training after ``patience`` validations in a row without a better key metric: Ignite's
    ``EarlyStopping`` (as Keras's, which the knee thesis used: sec. 4.5.5, patience 9) on the
    evaluator, whose key metric and ``key_metric_mode`` say what better is.

    Attach it to the trainer (a study's ``train_handlers``). Its counter and best score live in
    ``trainer.state`` (a ``state_dict`` user key), so a resumed run continues the count.
    """

    STATE_KEY = "early_stopping"

    def __init__(self, evaluator: Engine, patience: int, mode: str = "max") -> None:
        if int(patience) < 1:
            raise ValueError(f"patience must be a positive number of validations, got {patience}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got '{mode}'")
        self.evaluator = evaluator
        self.patience = int(patience)
        self.sign = 1.0 if mode == "max" else -1.0
        self.trainer: Engine | None = None
        self.stopper: Any = None

    def _score(self, evaluator: Engine) -> float:
        return self.sign * float(evaluator.state.metrics[evaluator.state.key_metric_name])

    def attach(self, trainer: Engine) -> None:
        from ignite.handlers import EarlyStopping as IgniteEarlyStopping

        self.trainer = trainer
        self.stopper = IgniteEarlyStopping(self.patience, self._score, trainer)
        if self.STATE_KEY not in trainer._state_dict_user_keys:
            trainer._state_dict_user_keys.append(self.STATE_KEY)
        setattr(trainer.state, self.STATE_KEY, dict(self.stopper.state_dict()))
        self.evaluator.add_event_handler(Events.COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        if self.trainer is None or self.trainer.state.epoch == 0:
            return  # an evaluation outside training
        self.stopper.load_state_dict(getattr(self.trainer.state, self.STATE_KEY))  # a resumed count
        self.stopper(evaluator)
        setattr(self.trainer.state, self.STATE_KEY, dict(self.stopper.state_dict()))


class StopOnNonFiniteLoss:
    """End a training that diverged with one ``error:`` line (exit status 1, the MLflow run FAILED)
    instead of training on and writing results of NaN weights.

    A NaN or infinite loss whose step left a network weight non-finite stops the run at once
    (without AMP, the first such loss); one that left the weights finite (with AMP, ``GradScaler``
    skips the step of a batch whose gradients overflow) stops it after ``patience`` in a row. The
    weights are also checked at every epoch's end, so a last step that broke them with a finite
    loss is caught before validation and the checkpoints. Ignite's ``TerminateOnNan`` would end the
    run as if it had finished.
    """

    def __init__(self, patience: int = 10) -> None:
        if int(patience) < 1:
            raise ValueError(f"patience must be a positive number of iterations, got {patience}")
        self.patience = int(patience)
        self._in_a_row = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check_weights)

    def __call__(self, engine: Engine) -> None:
        loss = iteration_loss(engine.state.output)
        if loss is None or math.isfinite(loss):
            self._in_a_row = 0
            return
        self._in_a_row += 1
        broken = _non_finite_weight(engine)
        if broken is not None:
            self._stop(engine, f"the loss is {loss} and the weights are no longer finite ('{broken}')")
        if self._in_a_row >= self.patience:
            self._stop(engine, f"the loss is {loss} and {self._in_a_row} losses in a row were not finite")

    def _check_weights(self, engine: Engine) -> None:
        broken = _non_finite_weight(engine)
        if broken is not None:
            self._stop(engine, f"the weights are no longer finite ('{broken}')")

    @staticmethod
    def _stop(engine: Engine, what: str) -> None:
        optimizer = getattr(engine, "optimizer", None)
        lr = f" (learning rate {optimizer.param_groups[0]['lr']:.3g})" if optimizer is not None else ""
        raise InputError(
            f"training diverged at epoch {engine.state.epoch}, iteration {engine.state.iteration}{lr}: "
            f"{what}; train again with a lower --learning_rate"
        )


def _non_finite_weight(engine: Engine) -> str | None:
    """The name of the first parameter of ``engine.network`` holding a NaN or an infinity, or None."""
    network = getattr(engine, "network", None)
    return first_non_finite(network.named_parameters()) if isinstance(network, torch.nn.Module) else None
