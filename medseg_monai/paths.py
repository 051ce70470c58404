"""Where the suite keeps things: project root, cache, data roots."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout holding ``datasets.json``, ``bundles/`` and ``mlflow/`` (parent of the package)."""
    return Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """``$MEDSEG_CACHE``, else ``$XDG_CACHE_HOME/medseg-monai``, else ``~/.cache/medseg-monai``."""
    if env := os.environ.get("MEDSEG_CACHE"):
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "medseg-monai").resolve()


def data_root_env() -> Path | None:
    """``$MEDSEG_DATA_ROOT``: the folder holding real datasets in folders named by their ids."""
    env = os.environ.get("MEDSEG_DATA_ROOT")
    return Path(env).expanduser().resolve() if env else None
