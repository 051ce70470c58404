"""What a run shows in the MLflow 3 UI beyond its metrics: the experiment kind, the training data as
a dataset input, the best checkpoint as a logged (and optionally registered) model, params as the
values the run resolved, and system metrics on request.

* :data:`EXPERIMENT_KIND`: MLflow 3 opens an experiment without ``mlflow.experimentKind`` on its
  GenAI traces page and asks what it is for; ``custom_model_development`` (the UI's "machine
  learning / model training" kind) opens it on the runs table.
* :func:`log_training_data`: the run's cases (id and split) as an ``mlflow.data`` dataset named by
  the dataset id, its digest the run record's content hash, its source the data root: the runs
  table's Dataset column then says which data trained the run.
* :func:`log_best_model`: ``mlflow.pytorch.log_model`` of the network with the best checkpoint's
  weights, its signature and an input example (a real input the network saw in validation), the
  ``medseg_monai`` package as its code so it loads without this repository; ``register`` adds a
  version of that registered model.
* :func:`resolved_params`: a merged config's settings as the run resolved them (MONAI's resolver's
  values, never evaluated here); what did not resolve to plain data is not a param.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from medseg_monai.errors import InputError

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "SYSTEM_METRICS_ENV",
    "best_weights",
    "log_best_model",
    "log_inputs_retrying",
    "log_training_data",
    "resolved_params",
    "system_metrics_wanted",
]

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SYSTEM_METRICS_ENV = "MEDSEG_SYSTEM_METRICS"
MODEL_NAME = "model"  # the logged model's name (its folder in the run's outputs)

_WORKFLOW_KEYS = ("imports", "initialize", "run", "finalize", "_meta_")
_SECTIONS = ("network_def", "loss", "optimizer", "lr_scheduler")
_MISSING = object()


# ----------------------------------------------------------------------------- params


def _plain(value: Any) -> Any:
    """``value`` as plain data (text, numbers, flags, null, lists and text-keyed mappings of them;
    tuples become lists), or ``_MISSING`` when any part is something else (an object, a tensor)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _MISSING if any(v is _MISSING for v in items) else items
    if isinstance(value, Mapping):
        items = {k: _plain(v) for k, v in value.items()}
        if not all(isinstance(k, str) for k in items) or any(v is _MISSING for v in items.values()):
            return _MISSING
        return items
    return _MISSING


def _resolve(item_id: str, written: Any, resolved: Mapping[str, Any]) -> Any:
    """The value the run gave ``item_id`` (written as ``written``): MONAI's resolved value of the id,
    of the id a reference names, or the written value itself when it is plain; ``_MISSING`` where
    nothing resolved (an expression the run never needed, a macro)."""
    if item_id in resolved:
        return _plain(resolved[item_id])
    if isinstance(written, str) and written.startswith("@"):
        target = written[1:]
        return _plain(resolved[target]) if target in resolved else _MISSING
    if isinstance(written, str) and written.startswith(("$", "%")):
        return _MISSING
    if isinstance(written, Mapping):
        items = {k: _resolve(f"{item_id}#{k}", v, resolved) for k, v in written.items()}
        return {k: v for k, v in items.items() if v is not _MISSING}  # a section keeps what resolved
    if isinstance(written, list):
        items = [_resolve(f"{item_id}#{i}", v, resolved) for i, v in enumerate(written)]
        return _MISSING if any(v is _MISSING for v in items) else items
    return _plain(written)


def _flat(value: Any) -> bool:
    scalar = value is None or isinstance(value, (bool, int, float, str))
    return scalar or (isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value))


def resolved_params(config: Mapping[str, Any], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """MLflow params of a merged bundle ``config`` with the values of MONAI's resolver ``resolved``
    (id -> value, as the running bundle resolved them): every top-level setting that resolved to a
    text, number, flag or flat list, and the network, loss, optimiser and scheduler sections with
    each argument's resolved value (``out_channels: 3``, not ``@num_classes``). An argument that
    did not resolve to plain data (``params: $@network.parameters()``) is left out: nothing here
    is evaluated."""
    params: dict[str, Any] = {}
    for key, written in config.items():
        if key in _WORKFLOW_KEYS:
            continue
        if key in _SECTIONS and isinstance(written, Mapping):  # resolved to the object it built
            args = {k: _resolve(f"{key}#{k}", w, resolved) for k, w in written.items()}
            if section := {k: v for k, v in args.items() if v is not _MISSING}:
                params[key] = section  # its arguments instead
            continue
        value = _resolve(key, written, resolved)
        if value is not _MISSING and _flat(value):
            params[key] = value
    return params


# ----------------------------------------------------------------------------- the dataset input


def log_training_data(record: Mapping[str, Any], context: str = "training") -> None:
    """Log the run's cases as an MLflow dataset input of the active run (``mlflow.log_input``): one
    row per case (``case_id``, ``split``) from the run record, named by the dataset id, with the
    record's content hash as digest and the data root as source."""
    import mlflow
    import pandas as pd

    dataset = record["dataset"]
    rows = [(case, split) for split, cases in dataset.get("cases", {}).items() for case in cases]
    frame = pd.DataFrame(rows, columns=["case_id", "split"])
    with warnings.catch_warnings():  # a local path is a local source, whichever reading MLflow picks
        warnings.simplefilter("ignore", UserWarning)
        data = mlflow.data.from_pandas(
            frame, source=str(dataset.get("root", "")), name=str(dataset["id"]), digest=str(dataset["hash"])
        )
    log_inputs_retrying(lambda: mlflow.log_input(data, context=context))


# MLflow's stores look a dataset up by (experiment, name, digest), then insert it if missing: runs
# started together (a grid's jobs) race between the two steps and the loser fails on the table's
# unique key (SQLite, PostgreSQL, MySQL wording)
_DATASET_RACE = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")


def log_inputs_retrying(call: Callable[[], object], attempts: int = 3) -> None:
    """Run ``call`` (an MLflow call that logs dataset inputs), again when another run stored the same
    dataset between MLflow's lookup and its insert: the next call finds it and only links it. Any
    other error, or the race lost ``attempts`` times, propagates."""
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            call()
            return
        except MlflowException as e:
            if attempt == attempts or not any(s in str(e) for s in _DATASET_RACE):
                raise
            time.sleep(0.1 * attempt)


# ----------------------------------------------------------------------------- the model


def best_weights(checkpoint: Path) -> dict[str, Any]:
    """The network's state dict in a checkpoint MONAI's ``CheckpointSaver`` wrote (``model.pt``: the
    state dict itself, or ``{"model": state dict}``), without DDP's ``module.`` prefix."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _requirements() -> list[str]:
    """Pinned requirements of the logged model, stated rather than inferred (MLflow would load the
    model in a subprocess to guess them); ``medseg_monai`` travels as the model's code."""
    names = ("torch", "monai", "numpy", "pytorch-ignite", "scipy", "nibabel", "scikit-image")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def log_best_model(network: Any, checkpoint: Path, input_example: Any, register: str | None = None) -> Any:
    """Log ``network`` with the weights of ``checkpoint`` (the best model) as the active run's MLflow
    model (``mlflow.pytorch.log_model``), on the CPU in eval mode, with the signature of its output
    on ``input_example`` (a tensor of one input) and that example; ``register`` (a name) also
    registers it. Returns MLflow's ``ModelInfo``."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model = copy.deepcopy(network).to("cpu").eval()
    model.load_state_dict(best_weights(checkpoint))
    example = input_example.detach().to("cpu", torch.float32)
    with torch.no_grad():
        output = model(example)
    if not isinstance(output, torch.Tensor):  # e.g. deep supervision's list: the first map is the output
        output = output[0]
    signature = infer_signature(example.numpy(), output.numpy())
    package = Path(__file__).resolve().parent
    return mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME,
        signature=signature,
        input_example=example.numpy(),
        code_paths=[str(package)],
        pip_requirements=_requirements(),
        registered_model_name=register or None,
        # MLflow 3's default "pt2" runs torch.export, which fails on some of the studies' networks
        # (the knee's EncoderDropoutUNet); the pickled module loads with medseg_monai as its code
        serialization_format="pickle",
    )


# ----------------------------------------------------------------------------- system metrics


def system_metrics_wanted() -> bool:
    """Whether ``MEDSEG_SYSTEM_METRICS=1`` asks for MLflow's system metrics (CPU, memory, disk,
    network; GPU with ``nvidia-ml-py``); refused in one line when ``psutil``, which MLflow samples
    them with, is not installed."""
    value = os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value not in ("1", "true", "yes"):
        raise InputError(f"{SYSTEM_METRICS_ENV} must be 1 or 0, got {value!r}")
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise InputError(
            f"{SYSTEM_METRICS_ENV}=1 needs psutil: pip install 'medseg-monai[system-metrics]'"
        ) from None
    return True
