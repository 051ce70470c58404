"""Helpers that bundle configs call: where things go, and what a run records next to its results.

Following nnU-Net, a run writes into its ``output_dir`` everything it decided: the merged config
(``config.json``), the datalist and split (``datalist.json``), and ``run.json`` with the data
fingerprint, versions, commit, device and seed.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from medseg_monai.data import (
    DatasetError,
    decathlon_doc,
    get_dataset,
    load_splits,
    resolve_data_root,
    write_json,
)
from medseg_monai.paths import project_root
from medseg_monai.tracking import content_hash, device_description, git_state

__all__ = [
    "bundle_root",
    "current_config",
    "default_output_dir",
    "hyperparameters",
    "image_files",
    "install_error_hook",
    "prepare_run",
    "require_file",
]


def bundle_root(study: str) -> str:
    """``<repo>/bundles/<study>``, whatever the working directory."""
    return str(project_root() / "bundles" / study)


def default_output_dir(study: str, experiment: str, seed: int) -> str:
    """``<repo>/runs/<study>/<experiment>/seed<seed>`` (git-ignored)."""
    return str(project_root() / "runs" / study / experiment / f"seed{seed}")


def install_error_hook() -> None:
    """End a bundle run on bad input with one ``error:`` line instead of a traceback maze.

    MONAI wraps what fails in a config or a transform in its own exceptions; when the chain holds
    a :class:`~medseg_monai.data.DatasetError` (a message that names the file or key at fault) or
    a file that could not be read (``OSError``, e.g. PIL's "cannot identify image file '<path>'",
    nibabel's ``ImageFileError``), only that message is printed. Anything else keeps Python's full
    traceback. Called first in a bundle's ``initialize``; a no-op when already installed.
    """
    from nibabel.filebasedimages import ImageFileError

    input_errors = (DatasetError, OSError, ImageFileError)
    if getattr(sys.excepthook, "medseg_error_hook", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        err: BaseException | None = exc
        seen: set[int] = set()
        while err is not None and id(err) not in seen:
            if isinstance(err, input_errors):
                print(f"error: {err}", file=sys.stderr)
                return
            seen.add(id(err))
            err = err.__cause__ or err.__context__
        previous(exc_type, exc, tb)

    hook.medseg_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file, else a one-line ``DatasetError`` naming ``what`` it should be."""
    if not Path(path).is_file():
        raise DatasetError(f"{what} not found: {path}")
    return path


def image_files(path: str, suffixes: tuple[str, ...] = (".png",)) -> list[dict[str, str]]:
    """Inference inputs: one file, or every file with one of ``suffixes`` in a folder, as
    ``{"image": path, "case_id": name}`` dicts (the name without its suffixes)."""
    p = Path(path).expanduser().resolve()
    files = sorted(f for f in p.iterdir() if f.name.lower().endswith(suffixes)) if p.is_dir() else [p]
    if not files or not files[0].is_file():
        raise DatasetError(f"no input image at {p} (expected a file or a folder of {', '.join(suffixes)})")
    return [{"image": str(f), "case_id": f.name.split(".")[0]} for f in files]


def current_config() -> dict[str, Any]:
    """The merged raw config (files + CLI overrides, expressions unevaluated) of the bundle being run.

    Called from a config expression (``"$medseg_monai.bundle.current_config()"``): the
    ``ConfigParser`` evaluating it is on the call stack. MONAI gives a config no other handle on
    itself, and recording exactly what ran is worth this one look up the stack.
    """
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return json.loads(json.dumps(candidate.get(), default=str))
        frame = frame.f_back
    raise RuntimeError("current_config() must be called from a MONAI bundle config expression")


def prepare_run(
    output_dir: str,
    study: str,
    experiment: str,
    dataset: str,
    data_root: str | None,
    seed: int,
    device: Any = None,
    splits: dict[str, list[dict[str, Any]]] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create ``output_dir`` and write what the run decided: ``config.json`` (merged config),
    ``datalist.json`` (the cases actually used, Decathlon style, from ``splits``: ``train``/``val``/
    ``test`` item lists, default the registry split) and ``run.json`` (data fingerprint, case ids,
    device, command, commit, versions). Returns run.json's content."""
    from importlib.metadata import version

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_dataset(dataset)
    root = resolve_data_root(dataset, data_root)
    parts = splits if splits is not None else load_splits(dataset, root)
    write_json(decathlon_doc(dataset, root, parts), out / "datalist.json")
    if config is not None:
        write_json(config, out / "config.json")
    record = {
        "study": study,
        "experiment": experiment,
        "seed": seed,
        "dataset": {
            "id": spec.id,
            "kind": spec.kind,
            "root": str(root),
            "hash": content_hash([root]),
            "split_seed": spec.split["seed"],
            "cases": {k: [c["case_id"] for c in v] for k, v in parts.items()},
        },
        "device": device_description(device),
        "command": sys.argv,
        "cwd": os.getcwd(),
        **git_state(project_root()),
        "versions": {
            "python": platform.python_version(),
            **{
                p: version(p) for p in ("torch", "monai", "mlflow", "numpy", "pytorch-ignite", "medseg-monai")
            },
        },
    }
    write_json(record, out / "run.json")
    return record


_RECORDED_SECTIONS = ("network_def", "loss", "optimizer", "lr_scheduler")
_WORKFLOW_KEYS = ("imports", "initialize", "run", "finalize")


def hyperparameters(**extra: Any) -> dict[str, Any]:
    """What a run decided, for MLflow params: the config's top-level scalar settings (as written,
    expressions included), its network, loss, optimiser and scheduler definitions, and ``extra``
    resolved values (e.g. the actual training-set size)."""
    config = current_config()
    params: dict[str, Any] = {}
    for key, value in config.items():
        if key in _WORKFLOW_KEYS:
            continue
        scalar = isinstance(value, (str, int, float, bool)) or value is None
        if scalar or (isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)):
            params[key] = value
    params.update({k: config[k] for k in _RECORDED_SECTIONS if isinstance(config.get(k), dict)})
    params.update(extra)
    return params
