"""Helpers the tests share: running bundles (the launcher's command line in a process of its own,
against a private MLflow store), inputs in another geometry, and a network's gradient check."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser

from medseg_monai.config import command_line, config_files, config_parser
from medseg_monai.launch import redirect_output

ROOT = Path(__file__).resolve().parents[1]


def run_bundle(
    study: str,
    mlflow_dir: Path,
    mode: str = "train",
    experiment: str | None = None,
    profile: str | None = "quick",
    timeout: int = 600,
    **overrides: object,
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the launcher's config list for (study, mode, experiment,
    profile), with ``overrides`` as ``--key value`` pairs, from the repository root."""
    files = config_files(study, mode, experiment, profile)
    args = command_line(files, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})
    return run_python_module(args, local_store_env(mlflow_dir), timeout)


def run_python_module(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``args`` (``python -m <module> ...``) run as that command would, with ``env``, from the
    repository root: its exit status and its stdout and stderr as text.

    The process is forked from a server that has imported torch, MONAI and MLflow once (the grid's
    ``local`` launcher, :mod:`medseg_monai.launch`), not started as a new interpreter: the same
    module, arguments, environment, error hook and at-exit handlers, without the 7 s of imports that
    each of the suite's hundred-odd bundle runs would otherwise pay."""
    if args[:2] != [sys.executable, "-m"]:
        raise ValueError(f"not a python -m command: {args[:3]}")
    from medseg_monai.reproduce import _PRELOAD

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = context.Process(target=_module_as_main, args=(args[2:], env, str(ROOT), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(args, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(args, int(proc.exitcode), out.read_text(), err.read_text())


def _module_as_main(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The body of :func:`run_python_module`'s process: what the interpreter does for ``python -m``."""
    import atexit
    import runpy
    import warnings

    import torch

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # as -m puts the working folder first
    redirect_output(out, err, append=False)
    if env.get("PYTHONWARNINGS"):  # read at interpreter start, which this process skipped
        warnings.simplefilter(env["PYTHONWARNINGS"])  # type: ignore[arg-type]
    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = list(argv)
    code = 0
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()  # MLflow's and logging's, as at a normal interpreter exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def local_store_env(mlflow_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process that tracks to the MLflow store in ``mlflow_dir`` (never
    to a server the user's ``MLFLOW_TRACKING_URI`` names), warnings off, with ``extra`` variables."""
    env = {**os.environ, "MEDSEG_MLFLOW_DIR": str(mlflow_dir), "PYTHONWARNINGS": "ignore", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train_quick(study: str, tmp_path_factory: Any, **overrides: object) -> tuple[Path, Path]:
    """One quick-profile training of ``study`` (output folder, MLflow folder), for module fixtures."""
    out = tmp_path_factory.mktemp(f"{study}-run")
    store = tmp_path_factory.mktemp(f"{study}-mlflow")
    result = run_bundle(study, store, output_dir=out, **overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, store


def parse(files: list[str], overrides: dict[str, object] | None = None) -> ConfigParser:
    """The parsed config of ``files`` with ``overrides``, as a bundle run builds it (from the root)."""
    parser = config_parser(files, overrides)
    parser.parse()
    return parser


def parse_study(
    study: str, experiment: str | None = None, profile: str | None = None, **overrides: object
) -> ConfigParser:
    """A study's training config (with an experiment and profile) parsed with ``overrides``."""
    return parse(config_files(study, experiment=experiment, profile=profile), overrides)


def mlflow_client(mlflow_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{mlflow_dir / 'mlflow.db'}")


def metric_values(client: MlflowClient, run_id: str, metric: str) -> list[float]:
    """A run's history of ``metric``, in step order."""
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def flipped_crop(src: str | Path, dst: Path, y: slice, z: slice) -> tuple[np.ndarray, np.ndarray]:
    """Write the NIfTI ``src`` flipped along x and cropped to ``y`` and ``z`` (starts >= 0) as ``dst``,
    with the affine that keeps every voxel where it was in the world: another shape, orientation
    and origin for the same anatomy. Returns (data, affine)."""
    image = nib.load(src)
    data = np.asarray(image.dataobj)[::-1, y, z]
    affine = image.affine @ np.array(
        [[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, y.start or 0], [0, 0, 1, z.start or 0], [0, 0, 0, 1]]
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), dst)
    return data, affine


def gradient_check(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)``, after checking that a loss on it sends a finite, non-zero gradient to every parameter."""
    y = net(x)
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    return y


def write_toy_registry(tmp_path: Path, entry_changes: dict | None = None) -> Path:
    """``tmp_path/datasets.json`` holding one real WMH-like dataset ``toy`` (FLAIR and T1 per
    ``{site}/{subject}``), its entry updated with ``entry_changes``, for ``MEDSEG_REGISTRY``."""
    entry = {
        "id": "toy",
        "study": "wmh",
        "kind": "real",
        "description": "toy",
        "citation": "none",
        "licence": "CC0",
        "obtain": {"url": "https://example.org/toy", "instructions": "unpack toy.zip"},
        "layout": {
            "case": "{site}/{subject}/flair.nii.gz",
            "case_id": "{subject}",
            "images": {"flair": "{site}/{subject}/flair.nii.gz", "t1": "{site}/{subject}/t1.nii.gz"},
            "label": "{site}/{subject}/wmh.nii.gz",
        },
        "labels": {
            "structures": {"0": "background", "1": "wmh"},
            "classes": {"default": {"background": [], "wmh": ["wmh"]}},
        },
        "intensity": {"bit_depth": 16, "normalised": False},
        "split": {"fractions": [0.7, 0.15, 0.15], "seed": 0},
    }
    entry.update(entry_changes or {})
    path = tmp_path / "datasets.json"
    path.write_text(json.dumps({"version": 1, "datasets": [entry]}))
    return path
