"""Shared fixtures: the real samples beside the project and an isolated cache."""

from __future__ import annotations

import locale
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("MEDSEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker, and the processes its
    tests start, get an equal share of the cores: small tensors run faster on one thread than on
    threads fighting over two cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (the real samples); tests using it skip, saying why, where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real samples not found at {SHARED_DATA} (set MEDSEG_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _keep_locale() -> Iterator[None]:
    """Put the process locale back after each test: ITK's DICOM (GDCM) I/O switches the whole process
    to the C locale, after which open() in a later test of the same worker decodes UTF-8 YAML
    (e.g. WMH's "Røvang") as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep tests off the user's data root and MLflow store; share one synthetic cache per session."""
    monkeypatch.delenv("MEDSEG_DATA_ROOT", raising=False)
    monkeypatch.delenv("MEDSEG_REGISTRY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path_factory.getbasetemp() / "medseg-cache"))
