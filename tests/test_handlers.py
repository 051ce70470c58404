"""The shared wiring's handlers on small engines: LR stepping, progress, the MLflow tracker reading
the run record, and the record itself (rank filtering and the other runtime helpers:
tests/test_runtime.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from mlflow.tracking import MlflowClient
from monai.engines import SupervisedTrainer

from medseg_monai import record, tracking
from medseg_monai.errors import InputError
from medseg_monai.handlers import (
    MLflowTracker,
    ProgressLog,
    SchedulerStepper,
    StopOnNonFiniteLoss,
    ValidationSchedule,
    config_params,
)
from medseg_monai.handlers import progress as progress_module
from medseg_monai.handlers.training import validation_iterations
from medseg_monai.io import write_json


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _evaluator(values: list[float], name: str = "val_dice") -> Engine:
    """An engine that, like MONAI's evaluators, names its key metric and scores one value per run."""
    evaluator = Engine(lambda e, b: None)
    scores = iter(values)

    @evaluator.on(Events.STARTED)
    def _name(engine: Engine) -> None:
        engine.state.key_metric_name = name

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _score(engine: Engine) -> None:
        engine.state.metrics[name] = next(scores)

    return evaluator


def test_plateau_scheduler_follows_the_key_metric_after_each_validation() -> None:
    opt = _optimizer()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=1)
    evaluator = _evaluator([0.5, 0.6, 0.6, 0.6, 0.7])
    trainer = Engine(lambda e, b: None)
    SchedulerStepper(sched, evaluator).attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine: Engine) -> None:
        evaluator.run([0])

    lrs = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: lrs.append(opt.param_groups[0]["lr"]))
    trainer.run([0, 1, 2], max_epochs=5)
    # improved, improved, 1 bad epoch (patience 1), 2 bad: halve, improved
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="needs the evaluator"):
        SchedulerStepper(sched)


def test_validation_iterations_are_evenly_spaced_and_end_the_epoch() -> None:
    assert validation_iterations(8, 1) == [8]
    assert validation_iterations(8, 5) == [2, 4, 5, 7, 8]
    assert validation_iterations(100, 5) == [20, 40, 60, 80, 100]
    assert validation_iterations(3, 5) == [1, 2, 3]  # a short epoch: after every iteration
    with pytest.raises(ValueError, match="at least 1"):
        ValidationSchedule(None, per_epoch=0)


@pytest.mark.parametrize(
    ("per_epoch", "interval", "expected"),
    [(1, 1, [8, 16, 24]), (1, 2, [16]), (5, 1, [2, 4, 5, 7, 8, 10, 12, 13, 15, 16, 18, 20, 21, 23, 24])],
)
def test_validation_schedule_runs_k_times_an_epoch(
    per_epoch: int, interval: int, expected: list[int]
) -> None:
    trainer = Engine(lambda e, b: None)
    schedule = ValidationSchedule(None, per_epoch=per_epoch, interval=interval)
    ran: list[tuple[int, int]] = []

    class _Validator:  # MONAI's evaluator.run(global_epoch), recorded with the trainer's iteration
        def run(self, epoch: int) -> None:
            ran.append((trainer.state.iteration, epoch))

    schedule.validator = _Validator()
    schedule.attach(trainer)
    trainer.run(list(range(8)), max_epochs=3)
    assert [it for it, _ in ran] == expected
    assert [ep for _, ep in ran] == [(it - 1) // 8 + 1 for it in expected]  # the trainer's epoch


def test_plateau_scheduler_steps_after_every_validation_of_an_epoch() -> None:
    # the reference's ReduceLROnPlateau steps after each of its 5 evaluations an epoch
    opt = _optimizer()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=2)
    evaluator = _evaluator([0.5] * 10)
    trainer = Engine(lambda e, b: None)
    SchedulerStepper(sched, evaluator).attach(trainer)
    schedule = ValidationSchedule(None, per_epoch=5)
    schedule.validator = type("V", (), {"run": lambda self, epoch: evaluator.run([0])})()
    schedule.attach(trainer)
    trainer.run(list(range(10)), max_epochs=2)
    # 10 validations, no improvement after the first: halved after bad runs 3 and 6 and 9
    assert opt.param_groups[0]["lr"] == 0.125


@pytest.mark.parametrize(("epoch_level", "steps"), [(False, 6), (True, 2)])
def test_other_schedulers_step_per_iteration_or_per_epoch(epoch_level: bool, steps: int) -> None:
    opt = _optimizer()
    decay = 0.1  # Keras's time-based decay: lr = lr0 / (1 + decay * step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + decay * step))
    trainer = Engine(lambda e, b: None)
    SchedulerStepper(sched, epoch_level=epoch_level).attach(trainer)
    trainer.run([0, 1, 2], max_epochs=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / (1 + decay * steps))


def _trainer(loss_of: object, lr: float = 0.1) -> SupervisedTrainer:
    """MONAI's trainer of a 2 -> 1 linear network on four constant batches, ``loss_of(pred, target)``."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    batches = [{"image": torch.ones(1, 2), "label": torch.zeros(1, 1)}] * 4
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=loss_of,
    )


def test_a_finite_training_runs_through_the_divergence_check() -> None:
    trainer = _trainer(torch.nn.MSELoss())
    StopOnNonFiniteLoss().attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 8


def test_a_nan_loss_that_reached_the_weights_stops_training_at_once() -> None:
    # the loss turns NaN at the third step: its gradient makes the weights NaN on that step
    calls = iter(range(100))

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = torch.nn.functional.mse_loss(pred, target)
        return value * float("nan") if next(calls) == 2 else value

    trainer = _trainer(loss, lr=0.5)
    StopOnNonFiniteLoss(patience=10).attach(trainer)
    with pytest.raises(InputError) as caught:
        trainer.run()
    assert trainer.state.iteration == 3
    assert str(caught.value) == (
        "training diverged at epoch 1, iteration 3 (learning rate 0.5): the loss is nan and the weights "
        "are no longer finite ('weight'); train again with a lower --learning_rate"
    )


def test_weights_broken_by_an_epochs_last_step_stop_training_before_validation() -> None:
    # a finite loss with a NaN gradient (sqrt's at 0, times 0) on epoch 1's last step: NaN weights
    calls = iter(range(100))

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = torch.nn.functional.mse_loss(pred, target)
        return value + torch.sqrt(((pred - pred.detach()) ** 2).sum()) if next(calls) == 3 else value

    trainer = _trainer(loss)
    validated = []
    StopOnNonFiniteLoss().attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validated.append(e.state.epoch))
    with pytest.raises(InputError) as caught:
        trainer.run()
    assert validated == []  # attached after it, as the bundles' validation is
    assert str(caught.value) == (
        "training diverged at epoch 1, iteration 4 (learning rate 0.1): the weights are no longer finite "
        "('weight'); train again with a lower --learning_rate"
    )


def test_non_finite_losses_with_finite_weights_stop_training_after_patience_in_a_row() -> None:
    # as with AMP, where GradScaler skips the step of an overflowing batch: the weights stay finite
    losses = [1.0, float("inf"), float("inf"), 2.0, float("inf"), float("nan"), float("inf"), 3.0]
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(losses[engine.state.iteration - 1])})
    trainer.network = torch.nn.Linear(2, 1)
    StopOnNonFiniteLoss(patience=3).attach(trainer)
    with pytest.raises(InputError) as caught:
        trainer.run([0] * 8, max_epochs=1)
    # two in a row (iterations 2-3) are forgiven; the third of 5-7 stops it
    assert str(caught.value) == (
        "training diverged at epoch 1, iteration 7: the loss is inf and 3 losses in a row were not finite; "
        "train again with a lower --learning_rate"
    )


def test_the_divergence_check_refuses_a_patience_below_one() -> None:
    with pytest.raises(ValueError, match="patience must be a positive number of iterations, got 0"):
        StopOnNonFiniteLoss(patience=0)


@pytest.mark.parametrize("resumed_after", [0, 7])
def test_progress_times_only_this_process_epochs(
    resumed_after: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten seconds an iteration, one iteration an epoch: 0:10 per epoch whether the run started
    at epoch 0 or was resumed after epoch 7 (a handler attached later restores the counter at
    STARTED, as ``ResumableTraining`` does); timing from epoch 0 would show 0:01."""
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])

    def step(engine: Engine, batch: object) -> dict:
        clock[0] += 10.0
        return {"loss": torch.tensor(1.0)}

    trainer = Engine(step)
    ProgressLog().attach(trainer)

    @trainer.on(Events.STARTED)
    def _resume(engine: Engine) -> None:
        engine.state.epoch = resumed_after
        engine.state.iteration = resumed_after

    with caplog.at_level("INFO", logger="medseg_monai.progress"):
        trainer.run([0], max_epochs=10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 10 - resumed_after
    assert lines[0].startswith(f"epoch {resumed_after + 1}/10")
    assert all(" 0:10 per epoch" in line for line in lines), lines
    assert lines[-2].endswith("ETA 0:10")


def test_merged_config_follows_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("section: {a: 1, b: '@x'}\n")
    (tmp_path / "train.yaml").write_text(f"x: 2\nsection: '%{tmp_path}/base.yaml#section'\nlr: 0.1\n")
    (tmp_path / "quick.yaml").write_text("lr: 0.5\n")
    (tmp_path / "metadata.json").write_text('{"version": "0.1.0"}')
    files = f"['{tmp_path}/train.yaml','{tmp_path}/quick.yaml']"
    argv = [
        "monai.bundle",
        "run",
        "--config_file",
        files,
        "--x",
        "3",
        "--meta_file",
        f"{tmp_path}/metadata.json",
    ]
    # files layered in order, the metadata, then the overrides; macros expanded, references as written
    expected = {"x": 3, "section": {"a": 1, "b": "@x"}, "lr": 0.5, "_meta_": {"version": "0.1.0"}}
    assert record.merged_config(argv) == expected
    assert record.merged_config(["python", "-c", "pass"]) is None


def test_config_params_are_plain_settings_and_method_sections() -> None:
    config = {
        "imports": ["$import os"],
        "lr": 0.1,
        "channels": ["flair", "t1"],
        "neighbours": 3,
        "in_channels": "$len(@channels) * @neighbours",  # an expression: never evaluated, not a param
        "val_batch_size": "@neighbours",  # a reference: not a param either
        "device": "$torch.device('cpu')",
        "nested_list": [[1, 2]],
        "network_def": {"_target_": "torch.nn.Identity"},
        "network": "$@network_def",
        "train": {"trainer": {}},
        "run": ["$@train#trainer.run()"],
    }
    assert config_params(config) == {
        "lr": 0.1,
        "channels": ["flair", "t1"],
        "neighbours": 3,
        "network_def": {"_target_": "torch.nn.Identity"},  # the method's sections as written
    }
    config["loss"] = {"_target_": "DiceLoss"}
    assert config_params(config)["loss"] == {"_target_": "DiceLoss"}


def test_tracker_tags_from_the_run_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    out = tmp_path / "run"
    record = {
        "study": "toy",
        "experiment": "baseline",
        "profile": "quick",
        "seed": 4,
        "dataset": {"id": "toy-synthetic", "kind": "synthetic", "root": "/x", "hash": "abc123", "cases": {}},
        "device": "cpu",
        "git": {"git.commit": "deadbeef", "git.dirty": "false"},
        "versions": {"torch": "9.9", "pytorch-ignite": "0.5"},
    }
    write_json(record, out / "run.json")
    write_json({"lr": 0.25, "train": {"trainer": {}}}, out / "config.json")
    trainer = Engine(lambda e, b: {"loss": torch.tensor(float(b))})
    tracker = MLflowTracker("toy", "baseline seed4", str(out), params={"n_train": 3})
    tracker.attach(trainer)
    trainer.run([1.0, 3.0], max_epochs=2)
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    run = client.get_run(json.loads((out / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "baseline seed4"
    tags = run.data.tags
    assert (tags["dataset.hash"], tags["git.commit"], tags["profile"], tags["seed"]) == (
        "abc123",
        "deadbeef",
        "quick",
        "4",
    )
    assert tags["version.pytorch_ignite"] == "0.5" and tags["variant"] == "baseline"
    assert run.data.params == {"lr": "0.25", "n_train": "3"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2.0, 2.0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "run.json",
        "config.json",
        "mlflow_run.json",
    }


def test_tracker_without_a_record_refuses_in_one_line(tmp_path: Path) -> None:
    trainer = Engine(lambda e, b: None)
    MLflowTracker("toy", "x", str(tmp_path)).attach(trainer)
    with pytest.raises(InputError, match=r"no run record at .*run.json"):
        trainer.run([0], max_epochs=1)
