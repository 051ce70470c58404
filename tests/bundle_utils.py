"""Running bundles from tests: the CLI in a subprocess, against a private MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def configs(study: str, *names: str) -> str:
    """``--config_file`` value layering ``names`` (e.g. "train", "quick", "experiments/x")."""
    paths = [str(ROOT / "bundles" / study / "configs" / f"{n}.yaml") for n in names]
    return "[" + ",".join(f"'{p}'" for p in paths) + "]"


def run_bundle(
    study: str, names: list[str], mlflow_dir: Path, timeout: int = 600, **overrides: object
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` with ``overrides`` as ``--key value`` pairs."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs(study, *names)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "MEDSEG_MLFLOW_DIR": str(mlflow_dir), "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def mlflow_client(mlflow_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{mlflow_dir / 'mlflow.db'}")


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]
