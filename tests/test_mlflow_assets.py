"""MLflow 3 as its users expect (issue #40 item 4): experiments open on their runs table, the training
data is a dataset input, the best checkpoint a logged (and registered) model, params are resolved
values, system metrics on request. Stores live in tmp_path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from mlflow.tracking import MlflowClient

from bundle_utils import error_lines, mlflow_client, run_bundle
from medseg_monai import tracking
from medseg_monai.errors import InputError
from medseg_monai.handlers import MLflowTracker
from medseg_monai.io import write_json
from medseg_monai.mlflow_assets import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    log_training_data,
    resolved_params,
    system_metrics_wanted,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MEDSEG_SYSTEM_METRICS", raising=False)
    yield tmp_path / "mlflow"
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_params_are_the_values_the_run_resolved() -> None:
    config = {
        "imports": ["$import medseg_monai"],
        "features": [8, 16],
        "class_names": "$@spec.class_names('default')",
        "num_classes": "$len(@class_names)",
        "unused": "$open('/etc/passwd').read()",  # never resolved by the run: not a param
        "batch_size": 4,
        "val_batch_size": "@batch_size",
        "device": "$torch.device('cpu')",
        "network_def": {
            "_target_": "UNet",
            "out_channels": "@num_classes",
            "channels": "@features",
            "act": ["relu", {"inplace": True}],
            "dropout": "$0.1 * 2",
        },
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
        "lr_scheduler": None,
        "run": ["$@trainer.run()"],
    }
    net = torch.nn.Linear(1, 1)
    resolved = {  # what MONAI's resolver holds after the bundle started
        "features": [8, 16],
        "class_names": ["background", "lungs", "heart"],
        "num_classes": 3,
        "batch_size": 4,
        "device": torch.device("cpu"),
        "network_def": net,  # the object: its arguments are the params
        "network_def#dropout": 0.2,
        "optimizer#params": net.parameters(),
    }
    assert resolved_params(config, resolved) == {
        "features": [8, 16],
        "class_names": ["background", "lungs", "heart"],
        "num_classes": 3,
        "batch_size": 4,
        "val_batch_size": 4,
        "network_def": {
            "_target_": "UNet",
            "out_channels": 3,
            "channels": [8, 16],
            "act": ["relu", {"inplace": True}],
            "dropout": 0.2,
        },
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.001},
        "lr_scheduler": None,
    }


def test_experiments_open_on_their_runs_table(store: Path) -> None:
    client = tracking.open_client()
    new = tracking.ensure_experiment("xray", client)
    assert (
        client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    )
    old = client.create_experiment("lv", artifact_location=(store / "a").as_uri())  # made before this
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    tracking.ensure_experiment("lv", client)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "genai_development")  # a user's choice stays
    tracking.ensure_experiment("lv", client)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def _toy_run(
    out: Path, network: torch.nn.Module, saved: torch.nn.Module | None = None, **tracker_args: object
) -> tuple[MLflowTracker, str]:
    """A two-epoch toy training validated each epoch (the network called in eval mode on 1 x 2 x 6 x 6
    inputs), whose best checkpoint ``out/model.pt`` holds the weights of ``saved`` (default: the
    network's); returns the tracker and its run id."""
    record = {
        "study": "toy",
        "experiment": "baseline",
        "profile": "quick",
        "seed": 0,
        "dataset": {
            "id": "toy-synthetic",
            "kind": "synthetic",
            "root": str(out.parent / "data"),
            "hash": "0123456789abcdef",
            "cases": {"train": ["a", "b", "c"], "val": ["d"]},
        },
        "device": "cpu",
        "git": {"git.commit": "deadbeef", "git.dirty": "false"},
        "versions": {"torch": torch.__version__},
    }
    write_json(record, out / "run.json")
    write_json({"lr": 0.5, "out_channels": "@classes", "classes": "$len([1, 2])"}, out / "config.json")
    torch.save((saved or network).state_dict(), out / "model.pt")

    def validate(engine: Engine, batch: torch.Tensor) -> None:
        network.eval()
        with torch.no_grad():
            network(batch)

    evaluator = Engine(validate)
    trainer = Engine(lambda e, b: {"loss": torch.tensor(1.0)})
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([torch.rand(2, 2, 6, 6)]))
    tracker = MLflowTracker(
        "toy", "baseline seed0", str(out), evaluator=evaluator, network=network, **tracker_args
    )
    tracker.attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    return tracker, json.loads((out / "mlflow_run.json").read_text())["run_id"]


def test_a_training_logs_its_data_and_its_best_model(tmp_path: Path) -> None:
    network = torch.nn.Conv2d(2, 3, 3, padding=1)
    out = tmp_path / "run"
    tracker, run_id = _toy_run(out, network, register="toy-unet", resolved={"classes": 2, "out_channels": 2})
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    run = client.get_run(run_id)
    # params as resolved: the reference and the expression became their values
    assert run.data.params == {"lr": "0.5", "out_channels": "2", "classes": "2"}
    # the Dataset column: the record's dataset, its content hash as digest, its cases as rows
    (data_input,) = run.inputs.dataset_inputs
    dataset = data_input.dataset
    assert (dataset.name, dataset.digest) == ("toy-synthetic", "0123456789abcdef")
    assert json.loads(dataset.profile) == {"num_rows": 4, "num_elements": 8}
    assert json.loads(dataset.source) == {"uri": str(tmp_path / "data")}
    assert {(t.key, t.value) for t in data_input.tags} == {("mlflow.data.context", "training")}
    # the Models column: the run's output is the logged model, with the weights of model.pt
    (output,) = run.outputs.model_outputs
    assert tracker.model_uri == f"models:/{output.model_id}"
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run_id and logged.name == "model"
    with torch.no_grad():
        network.weight.zero_()  # the live network moved on; the model is the checkpoint's
    model = mlflow.pytorch.load_model(tracker.model_uri)
    best = torch.load(out / "model.pt", weights_only=True)
    assert torch.equal(model.weight, best["weight"]) and model.weight.abs().sum() > 0
    info = mlflow.models.get_model_info(tracker.model_uri)
    assert info.signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 2, 6, 6)}}
    ]
    assert info.signature.outputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 3, 6, 6)}}
    ]
    # registered under --register's name, version 1, from this run
    (version,) = client.search_model_versions("name = 'toy-unet'")
    assert (int(version.version), version.run_id) == (1, run_id)


def test_a_checkpoint_that_does_not_fit_the_network_fails_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        _toy_run(out, torch.nn.Conv2d(2, 3, 3, padding=1), saved=torch.nn.Conv2d(2, 4, 3, padding=1))
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri=tracking.tracking_uri()).get_run(run_id)
    assert run.info.status == "FAILED" and not run.outputs.model_outputs


def test_a_training_without_a_best_checkpoint_logs_no_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tracker = MLflowTracker("toy", "x", str(out), network=torch.nn.Conv2d(1, 1, 1))
    write_json(
        {
            "study": "toy", "experiment": "e", "profile": "quick", "seed": 0, "device": "cpu", "git": {},
            "dataset": {"id": "toy-synthetic", "kind": "synthetic", "root": "/x", "hash": "ab", "cases": {}},
        },
        out / "run.json",
    )  # fmt: skip
    trainer = Engine(lambda e, b: None)
    tracker.attach(trainer)
    trainer.run([0], max_epochs=1)
    run = MlflowClient(tracking_uri=tracking.tracking_uri()).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and not run.outputs.model_outputs and tracker.model_uri is None


def test_system_metrics_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_SYSTEM_METRICS", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    out = tmp_path / "run"
    write_json(
        {
            "study": "toy", "experiment": "e", "profile": "quick", "seed": 0, "device": "cpu", "git": {},
            "dataset": {"id": "toy-synthetic", "kind": "synthetic", "root": "/x", "hash": "ab", "cases": {}},
        },
        out / "run.json",
    )  # fmt: skip
    trainer = Engine(lambda e, b: time.sleep(0.5))
    tracker = MLflowTracker("toy", "x", str(out))
    tracker.attach(trainer)
    trainer.run([0, 1, 2], max_epochs=1)
    metrics = MlflowClient(tracking_uri=tracking.tracking_uri()).get_run(tracker.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0


@pytest.mark.parametrize(("value", "wanted"), [("", False), ("0", False), ("1", True), ("true", True)])
def test_system_metrics_switch(value: str, wanted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_SYSTEM_METRICS", value)
    assert system_metrics_wanted() is wanted


def test_a_bad_system_metrics_switch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_SYSTEM_METRICS", "maybe")
    with pytest.raises(InputError, match="^MEDSEG_SYSTEM_METRICS must be 1 or 0, got 'maybe'$"):
        system_metrics_wanted()


@pytest.mark.slow
def test_a_quick_training_shows_its_dataset_and_model_in_mlflow(tmp_path: Path) -> None:
    """The real CLI: X-ray's quick profile at 32 px for two epochs with --register."""
    out, store = tmp_path / "run", tmp_path / "store"
    result = run_bundle(
        "xray", store, output_dir=out, image_size=32, max_epochs=2, train_size=8, register="xray-quick"
    )
    assert result.returncode == 0 and not error_lines(result), result.stderr[-3000:]
    client = mlflow_client(store)
    run = client.get_run(json.loads((out / "mlflow_run.json").read_text())["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    record = json.loads((out / "run.json").read_text())
    (data_input,) = run.inputs.dataset_inputs
    assert (data_input.dataset.name, data_input.dataset.digest) == (
        "xray-synthetic",
        record["dataset"]["hash"],
    )
    cases = record["dataset"]["cases"]
    assert len(cases["train"]) == 8
    assert json.loads(data_input.dataset.profile)["num_rows"] == len(cases["train"]) + len(cases["val"])
    params = run.data.params
    assert not [k for k, v in params.items() if v.startswith(("$", "@", "%"))]
    assert params["num_classes"] == params["network_def.out_channels"] == "3"
    assert params["network_def.features"] == "[8, 16, 32, 64, 128]"
    assert params["optimizer.lr"] == "0.001" and "optimizer.params" not in params
    assert params["image_shape"] == "[32, 32]" and "network" not in params
    (output,) = run.outputs.model_outputs
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    info = mlflow.models.get_model_info(f"models:/{output.model_id}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 32, 32)
    (version,) = client.search_model_versions("name = 'xray-quick'")
    assert version.run_id == run.info.run_id
    # the model holds the best checkpoint's weights and segments its input example
    model = mlflow.pytorch.load_model(info.model_uri)
    best = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    example = torch.as_tensor(np.asarray(mlflow.models.Model.load(info.model_uri).load_input_example()))
    assert example.shape == (1, 1, 32, 32) and model(example).shape == (1, 3, 32, 32)


def test_a_dataset_another_run_stored_meanwhile_is_linked_not_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs started together log the same dataset: MLflow looks it up, then inserts it, and the
    run that loses the race gets the store's unique-key error (seen in CI through an MLflow server:
    'BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, ...').
    Logging again finds the stored dataset and links it; any other error still fails."""
    from mlflow.exceptions import MlflowException, RestException

    real = mlflow.log_input
    calls: list[int] = []
    record = {"dataset": {"id": "toy", "hash": "abc123", "root": "/data", "cases": {"train": ["a", "b"]}}}

    def racing(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 1:  # the other run inserted the dataset between lookup and insert
            raise RestException(
                {
                    "error_code": "BAD_REQUEST",
                    "message": "(sqlite3.IntegrityError) UNIQUE "
                    "constraint failed: datasets.experiment_id, datasets.name, datasets.digest",
                }
            )
        real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", racing)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run() as run:
        log_training_data(record)
    inputs = MlflowClient(tracking_uri=tracking.tracking_uri()).get_run(run.info.run_id).inputs.dataset_inputs
    assert len(calls) == 2 and [(d.dataset.name, d.dataset.digest) for d in inputs] == [("toy", "abc123")]

    def broken(*args: object, **kwargs: object) -> None:
        raise MlflowException("the store is read-only")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with mlflow.start_run(), pytest.raises(MlflowException, match="read-only"):
        log_training_data(record)
