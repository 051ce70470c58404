"""Synthetic phantoms, one generator per study, written in the on-disk layout of that study's real
dataset so that the same loading path runs. Deterministic per seed; they test pipelines and
reproduce nothing."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg_monai.synthetic import brats, knee, lv, wmh, xray

__all__ = ["GENERATORS", "default_params", "generate"]

GENERATORS: dict[str, Callable[..., None]] = {
    "knee": knee.generate,
    "brats": brats.generate,
    "wmh": wmh.generate,
    "lv": lv.generate,
    "xray": xray.generate,
}


def _generator(name: str) -> Callable[..., None]:
    if name not in GENERATORS:
        raise ValueError(f"unknown generator '{name}'; known: {', '.join(GENERATORS)}")
    return GENERATORS[name]


def default_params(name: str) -> dict[str, Any]:
    """The keyword parameters of generator ``name`` with their defaults."""
    sig = inspect.signature(_generator(name))
    return {
        k: (list(p.default) if isinstance(p.default, tuple) else p.default)
        for k, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def generate(
    name: str,
    root: str | Path,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write dataset ``name`` into the (existing, empty) folder ``root``."""
    fn = _generator(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(default_params(name)))
    if unknown:
        raise ValueError(
            f"generator '{name}' has no parameter {', '.join(unknown)}; known: {', '.join(default_params(name))}"
        )
    fn(Path(root), seed, progress, **params)
