"""The LV paper's search rule as an Optuna sampler: log-uniform draws around the best trial so far."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = ["BestNeighbourhoodSampler"]


class BestNeighbourhoodSampler(optuna.samplers.BaseSampler):
    """The LV paper's search rule as an Optuna sampler.

    The first trial takes the ``start`` values. Every later trial draws each parameter
    log-uniformly in ``[b / factor, factor * b]`` (intersected with the parameter's distribution,
    i.e. its bounds), where ``b`` is its value in the best completed trial (Optuna's
    ``best_trial``: the best so far, so a candidate is "kept" exactly when it scores better). While
    no trial has completed, trials started beside the first (parallel workers) draw around the
    start values instead of repeating them. Whole-number parameters are drawn the same way and
    rounded. Each draw uses its own generator seeded by (``seed``, trial number, parameter name):
    the same history gives the same draws, whatever the order of the suggestions.
    """

    def __init__(self, start: Mapping[str, float], factor: float = 10.0, seed: int = 0) -> None:
        if factor <= 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        self.start = dict(start)
        self.factor = float(factor)
        self.seed = int(seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def _centre(self, study: optuna.Study, trial: FrozenTrial, name: str) -> tuple[float, bool]:
        """(b, draw): the value to draw around, and whether to draw (False: take the start value)."""
        start = self.start.get(name)
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            best = study.best_trial.params.get(name, start)
            if best is None:
                raise ValueError(f"no start value for parameter '{name}'")
            return float(best), True
        if start is None:
            raise ValueError(f"no start value for parameter '{name}'")
        in_flight = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        return float(start), any(t.number != trial.number for t in in_flight)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if not isinstance(param_distribution, (FloatDistribution, IntDistribution)):
            raise ValueError(f"{type(self).__name__} draws numbers only; '{param_name}' is not one")
        low, high = float(param_distribution.low), float(param_distribution.high)
        b, draw = self._centre(study, trial, param_name)
        if not draw:
            value = min(max(b, low), high)
        else:
            lo, hi = max(b / self.factor, low), min(b * self.factor, high)
            rng = np.random.default_rng([self.seed, trial.number, zlib.crc32(param_name.encode())])
            value = float(np.exp(rng.uniform(math.log(lo), math.log(hi)))) if lo < hi else lo
        if isinstance(param_distribution, IntDistribution):
            return int(min(max(round(value), param_distribution.low), param_distribution.high))
        return value
