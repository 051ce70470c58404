"""What a search searches: a bundle's ``search.yaml`` read and checked, and its searched settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from medseg_monai.errors import InputError

__all__ = ["Parameter", "SearchSpec", "load_spec"]

_SPEC_KEYS = {"metric", "direction", "steps", "trials", "factor", "seed", "parameters"}
_PARAM_KEYS = {"start", "min", "max", "type"}


@dataclass(frozen=True)
class Parameter:
    """A searched top-level setting: its start value, bounds and whether it is a whole number."""

    name: str
    start: float
    low: float
    high: float
    integer: bool = False

    def distribution(self) -> BaseDistribution:
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=True)
        return FloatDistribution(self.low, self.high, log=True)

    def suggest(self, trial: optuna.Trial) -> float | int:
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=True)
        return trial.suggest_float(self.name, self.low, self.high, log=True)


@dataclass
class SearchSpec:
    """A bundle's ``search.yaml`` (see :mod:`medseg_monai.search`)."""

    path: Path
    parameters: dict[str, dict[str, Any]]
    metric: str | None = None
    direction: str | None = None
    steps: int | dict[str, int] | None = None
    trials: int | dict[str, int] | None = None
    factor: float = 10.0
    seed: int = 0

    def per_profile(self, key: str, profile: str) -> int | None:
        value = getattr(self, key)
        if isinstance(value, dict):
            value = value.get(profile)
        return value

    def resolve(self, config_value: Callable[[str], Any]) -> list[Parameter]:
        """The parameters, a ``start: null`` taken from the bundle (``config_value(name)``)."""
        out = []
        for name, raw in self.parameters.items():
            start = raw.get("start")
            if start is None:
                start = config_value(name)
            where = f"{self.path}: parameter '{name}'"
            if isinstance(start, bool) or not isinstance(start, (int, float)) or not start > 0:
                raise InputError(
                    f"{where}: the start value must be a positive number (log-uniform draws), got {start!r}"
                )
            integer = raw.get("type", "int" if isinstance(start, int) else "float") == "int"
            low = raw.get("min", 1 if integer else start * 1e-6)
            high = raw.get("max", start * 1e6)
            if not 0 < low <= start <= high:
                raise InputError(f"{where}: needs 0 < min <= start <= max, got {low!r}, {start!r}, {high!r}")
            out.append(Parameter(name, start, low, high, integer))
        return out


def _number(value: Any, what: str, path: Path, positive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or not positive)
    if not ok:
        raise InputError(f"{path}: {what} must be a {'positive ' if positive else ''}number, got {value!r}")


def load_spec(path: str | Path) -> SearchSpec:
    """Read and check a ``search.yaml``; bad content stops with one line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"no search spec {path}: a bundle declares its search in configs/search.yaml "
            "(see bundles/README.md, 'Hyperparameter search')"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of {', '.join(sorted(_SPEC_KEYS))}")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key '{unknown[0]}' (keys: {', '.join(sorted(_SPEC_KEYS))})")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise InputError(f"{path}: 'parameters' must map each searched setting to its start value")
    parameters: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        entry = dict(value) if isinstance(value, dict) else {"start": value}
        bad = sorted(set(entry) - _PARAM_KEYS)
        if bad:
            raise InputError(
                f"{path}: parameter '{name}': unknown key '{bad[0]}' (keys: {', '.join(sorted(_PARAM_KEYS))})"
            )
        for key in ("start", "min", "max"):
            if entry.get(key) is not None:
                _number(entry[key], f"parameter '{name}': {key}", path)
        if entry.get("type", "float") not in ("int", "float"):
            raise InputError(f"{path}: parameter '{name}': type must be int or float, got {entry['type']!r}")
        parameters[str(name)] = entry
    direction = raw.get("direction")
    if direction not in (None, "maximize", "minimize"):
        raise InputError(f"{path}: direction must be maximize or minimize, got {direction!r}")
    for key in ("steps", "trials"):
        value = raw.get(key)
        for v in value.values() if isinstance(value, dict) else [] if value is None else [value]:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(
                    f"{path}: {key} must be a positive whole number (or one per profile), got {v!r}"
                )
    factor = raw.get("factor", 10.0)
    _number(factor, "factor", path)
    if factor <= 1:
        raise InputError(f"{path}: factor must be > 1, got {factor!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"{path}: seed must be a whole number, got {seed!r}")
    return SearchSpec(
        path=path,
        parameters=parameters,
        metric=raw.get("metric"),
        direction=direction,
        steps=raw.get("steps"),
        trials=raw.get("trials"),
        factor=float(factor),
        seed=seed,
    )
