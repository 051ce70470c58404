"""Hyperparameter search of a bundle: the LV paper's procedure, run on Optuna.

The procedure (Avetisian's method card): start from the current best settings; draw each searched
value in [0.1 p, 10 p] around the best value p so far; train a fixed number of optimiser steps (5000
in the paper); keep the candidate when its validation score is better. The card does not name the
distribution: we draw log-uniformly (uniform in log p), so that ten times less and ten times more
are equally likely; a uniform draw would land above p nine times in ten. Here:

- the rule is an Optuna sampler, :class:`BestNeighbourhoodSampler`: the first trial takes the start
  values, every later one draws each parameter log-uniformly in [b / factor, factor * b] (the
  interval clipped to the parameter's bounds) around its value b in the best completed trial;
  "keep the candidate if better" is then Optuna's ``best_trial``. Draws are seeded by
  (seed, trial number, parameter), so the same history gives the same draws;
- a trial is one training of the bundle through the launcher, in a subprocess, with the trial's
  values as overrides and ``max_epochs`` = ceil(steps / training batches per epoch) (whole epochs:
  at least ``steps`` steps), into ``runs/<study>/<profile>/search/<name>/trial<k>`` (its log:
  ``train.log`` there). Its score is the best value of ``metric`` in the training's MLflow run
  (every validation's: ``<metric>`` per epoch and ``<metric>_by_iteration`` when logged);
- the bundle declares what is searched in ``bundles/<study>/configs/search.yaml``::

      metric: val_dice          # default: the bundle's key metric; higher is better unless
      direction: maximize       #   direction: minimize (default: from key_metric_mode)
      steps: {paper: 5000, quick: 40}   # optimiser steps per trial (or one number)
      trials: {paper: 20, quick: 3}     # optional default of --trials
      factor: 10                # optional: draws in [b / factor, factor b]
      seed: 0                   # optional: the sampler's seed
      parameters:               # top-level keys of train.yaml; the first trial starts here
        learning_rate: null     #   null: the value the bundle is configured with (profile included)
        dropout: {start: 0.15, max: 0.9}  # start, min, max (default start / 1e6 .. start * 1e6), type: int

- Optuna's journal (``optuna.log`` in the search folder, safe for several processes on one
  machine; ``--storage`` takes another) holds the trials: running the same command again resumes.
  Completed trials are kept; a trial left RUNNING by a worker that is gone (killed) is marked FAIL
  and its parameters queued again, so the next free worker trains them; ``--trials N`` means N
  completed trials in all. Ctrl-C (or SIGTERM) stops the trainings cleanly and queues the running
  trials' parameters again. ``--workers K`` runs K worker processes on the same journal (so may
  several commands on one machine): a lock in the search folder makes each take a different trial
  and stop at N;
- MLflow: one parent run ``search <name>`` in the study's experiment; every trial's training run is
  its child (tag ``mlflow.parentRunId``, set through ``MEDSEG_MLFLOW_PARENT_RUN_ID``, which the
  tracker reads) with the trial's values among its params, metric ``search.score`` and tags
  ``search.*``. The parent logs ``score`` and ``best_score`` per trial and, at the end, the
  trajectory figure (``trajectory.png``, also in the search folder) and ``trials.csv``.

    python -m medseg_monai.search --study S [--trials N] [--workers K] [--steps S]
        [--profile quick|paper] [--name NAME] [--experiment E] [--storage URL] [--key value ...]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from medseg_monai.errors import InputError
from medseg_monai.paths import project_root

__all__ = [
    "BestNeighbourhoodSampler",
    "Parameter",
    "SearchSpec",
    "TrialFailed",
    "TrialInterrupted",
    "batches_per_epoch",
    "load_spec",
    "main",
    "open_study",
    "plot_trajectory",
    "run_worker",
    "search",
    "trial_points",
]

_SPEC_KEYS = {"metric", "direction", "steps", "trials", "factor", "seed", "parameters"}
_PARAM_KEYS = {"start", "min", "max", "type"}
_HOST = platform.node()


class TrialFailed(Exception):
    """A trial's training failed or gave no score: the message is one line (with the log's path)."""


class TrialInterrupted(TrialFailed):
    """A trial's training was stopped by a signal (SIGINT, SIGTERM): not the candidate's fault, so
    its parameters are queued again."""


# ----------------------------------------------------------------------------- the spec


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
    """A bundle's ``search.yaml`` (see the module's docstring)."""

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


# ----------------------------------------------------------------------------- the paper's rule


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


# ----------------------------------------------------------------------------- storage and locks


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (blocking): one process at a time claims or recovers trials."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (delivered on exit): the journal entries that belong together
    (a trial's FAIL and its retry; a trial and its folder's lock) are never split by an interrupt."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _held(path: Path) -> bool:
    """Whether some open file holds a lock on ``path`` (a live worker or training)."""
    if not path.is_file():
        return False
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _storage(folder: Path, storage: str | None) -> Any:
    """``--storage``: an Optuna storage URL (``sqlite:///...``, ...) or a journal file; default the
    journal ``<folder>/optuna.log``."""
    if storage and "://" in storage:
        return storage
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend  # type: ignore[no-redef]
    path = Path(storage).expanduser().resolve() if storage else folder / "optuna.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(
    name: str,
    folder: Path,
    parameters: Sequence[Parameter],
    direction: str = "maximize",
    *,
    settings: Mapping[str, Any] | None = None,
    factor: float = 10.0,
    seed: int = 0,
    storage: str | None = None,
) -> optuna.Study:
    """Create or load the Optuna study ``name`` (journal in ``folder`` unless ``storage``), with the
    paper's sampler. ``settings`` (what the trials compute: bundle, profile, steps, metric, start
    values, bounds, overrides) are stored with a new study; loading one started with other settings
    stops with one line, since its trials would not be comparable."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = BestNeighbourhoodSampler({p.name: p.start for p in parameters}, factor=factor, seed=seed)
    doc = json.loads(json.dumps(dict(settings or {}), default=str))
    with _locked(folder / "search.lock"):
        study = optuna.create_study(
            study_name=name,
            storage=_storage(folder, storage),
            direction=direction,
            sampler=sampler,
            load_if_exists=True,
        )
        saved = study.user_attrs.get("settings")
        if saved is None:
            study.set_user_attr("settings", doc)
        elif saved != doc:
            keys = sorted(k for k in set(saved) | set(doc) if saved.get(k) != doc.get(k))
            shown = "; ".join(f"{k}: {saved.get(k)!r} there, {doc.get(k)!r} now" for k in keys)
            raise InputError(
                f"search '{name}' in {folder} was started with other settings ({shown}): rerun it with "
                "the same ones to resume, or give another --name"
            )
        if study.direction.name.lower() != direction:
            raise InputError(
                f"search '{name}' in {folder} is to {study.direction.name.lower()}, not {direction}"
            )
    return study


# ----------------------------------------------------------------------------- the worker loop


def _count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _tag_abandoned(
    study: optuna.Study, number: int, trial_dir: Path, params: Mapping[str, Any], why: str
) -> None:
    """Best effort: name and tag the MLflow run of a trial that did not finish (when its training
    opened one) as the search's trial, with why it ended; its parameters are queued again."""
    if not (trial_dir / "mlflow_run.json").is_file():  # medseg_monai.tracking.RUN_RECORD (slow import)
        return
    from medseg_monai.tracking import open_client, recorded_run

    try:
        run_id = recorded_run(trial_dir)
        if run_id is None:
            return
        client = open_client()
        tags = {
            "mlflow.runName": f"search {study.study_name} trial {number}",
            "search.name": study.study_name,
            "search.role": "trial",
            "search.trial": str(number),
            "search.params": json.dumps(dict(params)),
            "search.error": f"{why}: its parameters were queued again",
        }
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    except Exception as e:  # the search goes on without the tags
        print(f"warning: could not tag the MLflow run of trial {number}: {e}", file=sys.stderr)


_LOCK_GRACE_S = 120  # a trial younger than this may not have recorded its worker yet


def _alive(pid: object) -> bool:
    """Whether ``pid`` (a trial's recorded worker, on this host) is a running process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _recover_stale(study: optuna.Study, folder: Path, say: Callable[[str], None]) -> None:
    """Under the search lock: a RUNNING trial of this host whose worker and training hold no lock
    any more was left by a process that died (killed, machine crash). It is marked FAIL and its
    parameters queued again (a WAITING trial the next ``ask`` takes), so the trial is neither lost
    nor run twice. Trials of other hosts are left to a worker there."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host", _HOST) != _HOST:
            continue
        if _alive(t.user_attrs.get("pid")):
            continue  # its worker lives: it may not hold its lock yet (asked, not yet locked; seen under load)
        started = t.datetime_start
        if (
            "pid" not in t.user_attrs
            and started
            and (datetime.datetime.now() - started).total_seconds() < _LOCK_GRACE_S
        ):
            continue  # asked so recently that its worker has not recorded itself yet
        trial_dir = Path(t.user_attrs.get("output_dir", folder / f"trial{t.number}"))
        if _held(trial_dir / ".worker.lock") or _held(trial_dir / ".lock"):
            continue  # a live worker, or its training still stopping
        if (trial_dir / "mlflow_run.json").is_file():  # best effort: the old training's MLflow run
            from medseg_monai.tracking import mark_stale_run

            with contextlib.suppress(Exception):
                mark_stale_run(trial_dir)
        _tag_abandoned(study, t.number, trial_dir, t.params, "its worker was gone (killed?)")
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        say(
            f"trial {t.number}: left running by a worker that is gone (killed?): marked FAIL, "
            f"its parameters queued again"
        )


@dataclass
class _Claim:
    trial: optuna.Trial
    params: dict[str, Any]
    folder: Path
    lock: Any = field(repr=False)


def _claim(
    study: optuna.Study,
    parameters: Sequence[Parameter],
    n_trials: int,
    folder: Path,
    say: Callable[[str], None],
) -> _Claim | None:
    """Under the search lock: recover stale trials, then, while fewer than ``n_trials`` are complete
    or running, ask for the next trial (a queued retry first), draw its values, and lock its folder
    for this worker. None when nothing is left to start."""
    with _signals_held(), _locked(folder / "search.lock"):
        _recover_stale(study, folder, say)
        if _count(study, TrialState.COMPLETE) + _count(study, TrialState.RUNNING) >= n_trials:
            return None
        trial = study.ask()
        params = {p.name: p.suggest(trial) for p in parameters}
        trial_dir = folder / f"trial{trial.number}"
        if trial_dir.exists():  # left by a deleted study of the same name: trial numbers are unique
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        lock = (trial_dir / ".worker.lock").open("a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"pid {os.getpid()} on {_HOST}\n")
        lock.flush()
        trial.set_user_attr("host", _HOST)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("output_dir", str(trial_dir))
        return _Claim(trial, params, trial_dir, lock)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_worker(
    study: optuna.Study,
    parameters: Sequence[Parameter],
    n_trials: int,
    folder: Path,
    objective: Callable[[optuna.Trial, dict[str, Any], Path], float],
    *,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    max_failures: int = 3,
    metric: str = "score",
    say: Callable[[str], None] | None = None,
) -> int:
    """Take trials until ``n_trials`` are complete (counting those of other workers): each is
    ``objective(trial, params, trial_folder)`` -> score, or :class:`TrialFailed` (the trial is FAIL,
    the worker goes on; after ``max_failures`` failures it stops, returning 1). An interrupt of the
    worker (Ctrl-C, SIGTERM) marks the running trial FAIL and queues its parameters again before it
    propagates; :class:`TrialInterrupted` (only the training was stopped) does the same and the
    worker goes on. Prints one line per finished trial; returns 0 when nothing is left to do."""
    say = say or (lambda line: print(line, flush=True))
    failures = 0
    while True:
        claim = _claim(study, parameters, n_trials, folder, say)
        if claim is None:
            return 0
        trial, started = claim.trial, time.perf_counter()
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in claim.params.items())
        retry = trial.user_attrs.get("retry_of")
        error, requeued = None, False
        try:  # the trial is told before its folder's lock goes: never seen running without a worker
            value = float(objective(trial, claim.params, claim.folder))
            if not math.isfinite(value):
                raise TrialFailed(f"{metric} is {value}")
        except (KeyboardInterrupt, SystemExit, TrialInterrupted) as e:
            with _signals_held(), _locked(folder / "search.lock"):
                trial.set_user_attr("error", f"interrupted: {e}"[:500])
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                study.enqueue_trial(claim.params, user_attrs={"retry_of": trial.number})
                say(f"trial {trial.number} interrupted: marked FAIL, its parameters queued again")
            _tag_abandoned(study, trial.number, claim.folder, claim.params, "interrupted")
            if not isinstance(e, TrialInterrupted):
                raise
            requeued = True  # not the candidate's failure: the queued retry comes next
        except Exception as e:
            error = (str(e).strip() or type(e).__name__).splitlines()[-1][:500]
            error = error if isinstance(e, TrialFailed) else f"{type(e).__name__}: {error}"
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL)
        else:
            frozen = study.tell(trial, value)
        finally:
            fcntl.flock(claim.lock, fcntl.LOCK_UN)
            claim.lock.close()
        if requeued:
            continue
        if error is not None:
            failures += 1
            say(f"trial {trial.number} FAILED ({shown}): {error}")
            if failures >= max_failures:
                say(f"{failures} trials failed in this worker: stopping")
                return 1
            continue
        for callback in callbacks:
            callback(study, frozen)
        best = study.best_trial
        done = _count(study, TrialState.COMPLETE)
        again = f" (retry of {retry})" if retry is not None else ""
        say(
            f"[{done}/{n_trials}] trial {trial.number}{again}: {shown} -> {metric} {value:.4f}; "
            f"best {best.value:.4f} (trial {best.number}); {time.perf_counter() - started:.0f} s"
        )


# ----------------------------------------------------------------------------- one bundle trial


def _parse_value(text: str) -> Any:
    """A ``--key value`` of the command line as the bundle CLI reads it: a Python literal (1e-3,
    [1, 2], True), true/false/null, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)


def batches_per_epoch(files: Sequence[str], overrides: Mapping[str, Any]) -> int:
    """Training batches (optimiser steps) per epoch of the bundle: ``len(train#dataloader)`` as the
    trainer sees it, built with ``cache_rate`` 0 (nothing is cached or preprocessed for counting)."""
    from medseg_monai.bundle import at_repo_root, config_parser

    parser = config_parser(files, dict(overrides))
    if "cache_rate" in parser.get():
        parser["cache_rate"] = 0.0
    with at_repo_root():
        return max(1, len(parser.get_parsed_content("train#dataloader")))


_LIBC: Any = None


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM when this process dies (Linux), so a killed
    worker leaves no training behind (the training stops cleanly on SIGTERM)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        _LIBC = _LIBC or ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _best_metric(client: Any, run_id: str, metric: str, direction: str) -> float:
    values = [
        m.value
        for key in (metric, f"{metric}_by_iteration")
        for m in client.get_metric_history(run_id, key)
        if math.isfinite(m.value)
    ]
    if not values:
        have = ", ".join(sorted(client.get_run(run_id).data.metrics)) or "none"
        raise TrialFailed(f"no value of {metric} in MLflow run {run_id} (its metrics: {have})")
    return max(values) if direction == "maximize" else min(values)


@dataclass
class _Setup:
    """Everything a search's workers share (built by :func:`_prepare`)."""

    study: str
    experiment_name: str  # the MLflow experiment: the bundle's @study
    bundle_experiment: str | None
    profile: str
    name: str
    files: list[str]
    overrides: dict[str, Any]
    parameters: list[Parameter]
    spec: SearchSpec
    metric: str
    direction: str
    steps: int
    n_trials: int
    folder: Path
    storage: str | None
    max_failures: int

    def settings(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "experiment": self.bundle_experiment,
            "profile": self.profile,
            "metric": self.metric,
            "direction": self.direction,
            "steps": self.steps,
            "factor": self.spec.factor,
            "seed": self.spec.seed,
            "parameters": {p.name: asdict(p) for p in self.parameters},
            "overrides": self.overrides,
        }

    def open(self) -> optuna.Study:
        return open_study(
            self.name,
            self.folder,
            self.parameters,
            self.direction,
            settings=self.settings(),
            factor=self.spec.factor,
            seed=self.spec.seed,
            storage=self.storage,
        )


class BundleTrial:
    """The objective of a bundle search: one training of the bundle with the trial's values (see the
    module's docstring); the training's MLflow run becomes the parent's child, tagged ``search.*``."""

    def __init__(self, setup: _Setup, parent_run_id: str | None) -> None:
        self.setup = setup
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.Trial, params: dict[str, Any], out: Path) -> float:
        from medseg_monai.bundle import command_line
        from medseg_monai.handlers.tracking import PARENT_RUN_ENV
        from medseg_monai.tracking import open_client, recorded_run

        s = self.setup
        overrides = {**s.overrides, **params, "output_dir": str(out)}
        batches = batches_per_epoch(s.files, overrides)
        epochs = max(1, math.ceil(s.steps / batches))
        overrides["max_epochs"] = epochs
        for key, value in {
            "batches_per_epoch": batches,
            "max_epochs": epochs,
            "steps": epochs * batches,
        }.items():
            trial.set_user_attr(key, value)
        log_path = out / "train.log"
        trial.set_user_attr("log", str(log_path))
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
        if self.parent_run_id:
            env[PARENT_RUN_ENV] = self.parent_run_id
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                command_line(s.files, **overrides),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=project_root(),
                env=env,
                preexec_fn=_die_with_parent(),
            )
            try:
                status = proc.wait()
            except BaseException:
                proc.terminate()  # an interrupted worker stops its training (cleanly, on SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=120)
                raise
        client = open_client()
        run_id = recorded_run(out)
        score, error, interrupted = None, None, False
        if status != 0:
            lines = log_path.read_text(errors="replace").splitlines()
            last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
            error = f"training exited with status {status}: {last.strip()[:300]}; log: {log_path}"
            interrupted = last.startswith("error: training stopped by SIG")  # RunInterrupted
        elif run_id is None:
            error = f"the training recorded no MLflow run in {out}; log: {log_path}"
        else:
            try:
                score = _best_metric(client, run_id, s.metric, s.direction)
            except TrialFailed as e:
                error = f"{e}; log: {log_path}"
        self._tag_child(client, trial, params, run_id, score, error)
        if error:
            raise TrialInterrupted(error) if interrupted else TrialFailed(error)
        return float(score)

    def _tag_child(
        self,
        client: Any,
        trial: optuna.Trial,
        params: dict[str, Any],
        run_id: str | None,
        score: float | None,
        error: str | None,
    ) -> None:
        """Name and tag the trial's run as the parent's child (one is created, FAILED, when the
        training failed before it opened its run), with the score as metric ``search.score``."""
        from mlflow.entities import Param

        from medseg_monai.tracking import ensure_experiment

        s = self.setup
        tags = {
            "mlflow.runName": f"search {s.name} trial {trial.number}",
            "search.name": s.name,
            "search.role": "trial",
            "search.trial": str(trial.number),
            "search.params": json.dumps(params),
            "search.steps": str(trial.user_attrs.get("steps", s.steps)),
            "profile": s.profile,
        }
        if error:
            tags["search.error"] = error[:4000]
        if run_id is None:  # the training failed before opening its run: a FAILED run stands for it
            exp_id = ensure_experiment(s.experiment_name, client)
            parent = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
            run_id = client.create_run(exp_id, tags={**tags, **parent}).info.run_id
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            client.set_terminated(run_id, status="FAILED")
        else:  # the training's own run, the parent's child already (MLflowTracker reads the env)
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
        if score is not None:
            client.log_metric(run_id, "search.score", score, step=trial.number)
        trial.set_user_attr("mlflow_run_id", run_id)


class _ParentMetrics:
    """After each completed trial: the parent run's ``score`` (step: the trial's number) and
    ``best_score`` (step: the number of completed trials, so that it never worsens when parallel
    trials finish out of order)."""

    def __init__(self, run_id: str) -> None:
        from medseg_monai.tracking import open_client

        self.run_id = run_id
        self.client = open_client()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.client.log_metric(self.run_id, "score", float(trial.value), step=trial.number)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        self.client.log_metric(self.run_id, "best_score", float(study.best_value), step=done)


# ----------------------------------------------------------------------------- the figure


def trial_points(study: optuna.Study) -> list[dict[str, Any]]:
    """The trials as the figure takes them: number, state, score (None unless complete), params."""
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "score": t.value if t.state == TrialState.COMPLETE else None,
            "params": dict(t.params),
        }
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.FAIL)
    ]


def plot_trajectory(points: Sequence[Mapping[str, Any]], metric: str, direction: str, title: str) -> bytes:
    """The search trajectory as a PNG: each trial's score by trial number with the best-so-far line
    (the kept candidates marked) above, the searched values per trial (log scale) below; failed
    trials as red crosses at the foot of the score panel."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p["number"])
    done = [p for p in points if p.get("score") is not None]
    failed = [p for p in points if p.get("score") is None]
    fig, (ax, axp) = plt.subplots(
        2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    better = max if direction == "maximize" else min
    best, best_line, kept = None, [], []
    for p in done:
        if best is None or better(best, p["score"]) != best:
            kept.append(p)
        best = p["score"] if best is None else better(best, p["score"])
        best_line.append(best)
    if done:
        xs = [p["number"] for p in done]
        ax.plot(xs, [p["score"] for p in done], "o", color="C0", alpha=0.6, label="trial")
        ax.step(xs, best_line, where="post", color="C1", label="best so far")
        ax.plot([p["number"] for p in kept], [p["score"] for p in kept], "*", color="C1", markersize=11,
                label="kept (better)")  # fmt: skip
    if failed:
        ax.plot([p["number"] for p in failed], [0.02] * len(failed), "x", color="red",
                transform=ax.get_xaxis_transform(), label="failed")  # fmt: skip
    ax.set_ylabel(f"{metric} ({direction})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names = sorted({k for p in points for k in p.get("params", {})})
    for i, name in enumerate(names):
        pts = [(p["number"], p["params"][name]) for p in points if name in p.get("params", {})]
        axp.plot([x for x, _ in pts], [v for _, v in pts], "o-", color=f"C{i + 2}", alpha=0.7, label=name,
                 markersize=4)  # fmt: skip
    if names:
        axp.set_yscale("log")
        axp.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    axp.xaxis.set_major_locator(MaxNLocator(integer=True))
    axp.set_ylabel("searched value")
    axp.set_xlabel("trial")
    axp.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the command


def _prepare(
    study: str,
    trials: int | None,
    steps: int | None,
    profile: str,
    name: str,
    experiment: str | None,
    overrides: Mapping[str, Any] | None,
    storage: str | None,
    bundles_dir: str | Path | None,
    runs_dir: str | Path | None,
    spec_file: str | Path | None,
    max_failures: int,
) -> _Setup:
    import difflib

    from medseg_monai.bundle import config_files, config_parser

    files = config_files(study, "train", experiment, profile, bundles_dir=bundles_dir)
    configs = Path(files[0]) if Path(files[0]).is_absolute() else project_root() / files[0]
    spec = load_spec(spec_file or configs.parent / "search.yaml")
    overrides = dict(overrides or {})
    parser = config_parser(files, overrides)
    config = parser.get()
    for pname in spec.parameters:
        if pname not in config:
            near = difflib.get_close_matches(pname, [k for k in config if isinstance(k, str)], n=1)
            hint = f": did you mean '{near[0]}'?" if near else " (searched settings are top-level keys)"
            raise InputError(f"{spec.path}: parameter '{pname}' is no setting of {', '.join(files)}{hint}")
    parameters = spec.resolve(lambda key: parser.get_parsed_content(key))
    key_metric = next(iter(config.get("key_metric") or {"val_dice": None}))
    metric = spec.metric or "val_" + key_metric.removeprefix("val_")  # as the tracker names it
    direction = spec.direction or (
        "minimize" if str(parser.get_parsed_content("key_metric_mode")) == "min" else "maximize"
    )
    n_steps = steps or spec.per_profile("steps", profile)
    if not n_steps or n_steps < 1:
        raise InputError(
            f"{spec.path}: no steps for profile '{profile}': add steps: {{{profile}: N}} or give --steps"
        )
    n_trials = trials or spec.per_profile("trials", profile)
    if not n_trials or n_trials < 1:
        raise InputError(f"give --trials N (or trials: {{{profile}: N}} in {spec.path})")
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"--name must be a plain folder name, got {name!r}")
    runs = Path(runs_dir) if runs_dir else project_root() / "runs"
    return _Setup(
        study=study,
        experiment_name=str(parser.get_parsed_content("study")),
        bundle_experiment=experiment,
        profile=profile,
        name=name,
        files=files,
        overrides=overrides,
        parameters=parameters,
        spec=spec,
        metric=metric,
        direction=direction,
        steps=int(n_steps),
        n_trials=int(n_trials),
        folder=(runs / study / profile / "search" / name).resolve(),
        storage=storage,
        max_failures=max_failures,
    )


def _parent_run(setup: _Setup, study: optuna.Study) -> str:
    """The search's MLflow parent run (recorded in the study), created on first use; set RUNNING."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    from medseg_monai.record import git_state
    from medseg_monai.tracking import ensure_experiment, flatten_params, open_client, tracking_uri

    client = open_client()
    with _locked(setup.folder / "search.lock"):
        attrs = study.user_attrs
        run_id = (
            attrs.get("mlflow_parent_run_id") if attrs.get("mlflow_tracking_uri") == tracking_uri() else None
        )
        if run_id is not None:
            try:
                if client.get_run(run_id).info.lifecycle_stage == "active":
                    client.update_run(run_id, status="RUNNING")
                    client.set_tag(run_id, "search.trials", str(setup.n_trials))  # --trials may grow
                    return run_id
            except MlflowException:
                pass
        exp_id = ensure_experiment(setup.experiment_name, client)
        suffix = "" if setup.profile == "paper" else f" ({setup.profile})"
        tags = {
            "mlflow.runName": f"search {setup.name}{suffix}",
            "search.name": setup.name,
            "search.role": "parent",
            "search.metric": setup.metric,
            "search.direction": setup.direction,
            "search.steps": str(setup.steps),
            "search.trials": str(setup.n_trials),
            "search.folder": str(setup.folder),
            "study": setup.study,
            "profile": setup.profile,
            **git_state(),
        }
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        params = flatten_params(
            {
                "metric": setup.metric,
                "direction": setup.direction,
                "steps": setup.steps,
                "factor": setup.spec.factor,
                "seed": setup.spec.seed,
                "experiment": setup.bundle_experiment or "",
                "start": {p.name: p.start for p in setup.parameters},
                "min": {p.name: p.low for p in setup.parameters},
                "max": {p.name: p.high for p in setup.parameters},
                "overrides": setup.overrides,
            }
        )
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        study.set_user_attr("mlflow_parent_run_id", run_id)
        study.set_user_attr("mlflow_tracking_uri", tracking_uri())
        return run_id


def _finish(setup: _Setup, study: optuna.Study, parent: str, status: int) -> None:
    """Write ``trials.csv`` and ``trajectory.png`` to the search folder, log them and the best trial
    into the parent run, and end it: FINISHED with ``n_trials`` complete and none running."""
    from medseg_monai.tracking import open_client

    client = open_client()
    study.trials_dataframe().to_csv(setup.folder / "trials.csv", index=False)
    title = f"{setup.study} search '{setup.name}' ({setup.profile}): {setup.steps} steps a trial"
    png = plot_trajectory(trial_points(study), setup.metric, setup.direction, title)
    (setup.folder / "trajectory.png").write_bytes(png)
    for name in ("trajectory.png", "trials.csv"):
        client.log_artifact(parent, str(setup.folder / name))
    complete = _count(study, TrialState.COMPLETE)
    client.set_tag(parent, "search.completed", str(complete))
    if complete:
        best = study.best_trial
        client.set_tag(parent, "search.best_trial", str(best.number))
        client.set_tag(parent, "search.best_params", json.dumps(best.params))
        client.log_metric(parent, "best", float(best.value))
    running = _count(study, TrialState.RUNNING)
    end = "FINISHED" if complete >= setup.n_trials and not running else "KILLED" if status == 130 else None
    end = end or ("FAILED" if status else None)
    if end:
        client.set_terminated(parent, status=end)


def _worker_command(setup: _Setup, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "medseg_monai.search", "--study", setup.study, "--worker"]
    argv += ["--trials", str(setup.n_trials), "--steps", str(setup.steps), "--profile", setup.profile]
    argv += ["--name", setup.name, "--max_failures", str(setup.max_failures)]
    for key in ("experiment", "storage", "bundles_dir", "runs_dir", "spec"):
        if getattr(args, key, None):
            argv += [f"--{key}", str(getattr(args, key))]
    for key, value in setup.overrides.items():
        argv += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return argv


def _sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


def search(args: argparse.Namespace, overrides: Mapping[str, Any]) -> int:
    """Run (or resume, or join) the search the command line describes; returns the exit status."""
    setup = _prepare(
        args.study,
        args.trials,
        args.steps,
        args.profile,
        args.name,
        args.experiment,
        overrides,
        args.storage,
        args.bundles_dir,
        args.runs_dir,
        args.spec,
        args.max_failures,
    )
    _sigterm_as_interrupt()
    study = setup.open()
    if args.worker:
        parent = study.user_attrs.get("mlflow_parent_run_id")
        try:
            return run_worker(
                study,
                setup.parameters,
                setup.n_trials,
                setup.folder,
                BundleTrial(setup, parent),
                callbacks=[_ParentMetrics(parent)] if parent else [],
                max_failures=setup.max_failures,
                metric=setup.metric,
            )
        except KeyboardInterrupt:
            return 130
    from medseg_monai.errors import redact
    from medseg_monai.tracking import tracking_uri

    parent = _parent_run(setup, study)
    complete = _count(study, TrialState.COMPLETE)
    print(
        f"search '{setup.name}' of {setup.study} ({setup.profile} profile): {setup.n_trials} trials of "
        f"{setup.steps} steps, {setup.metric} ({setup.direction}), {complete} complete already; "
        f"{args.workers} worker(s); trials in {setup.folder}; MLflow run {parent[:8]} at {redact(tracking_uri())}",
        flush=True,
    )
    started = time.perf_counter()
    status = 0
    try:
        if args.workers <= 1:
            status = run_worker(
                study,
                setup.parameters,
                setup.n_trials,
                setup.folder,
                BundleTrial(setup, parent),
                callbacks=[_ParentMetrics(parent)],
                max_failures=setup.max_failures,
                metric=setup.metric,
            )
        else:
            cmd = _worker_command(setup, args)
            procs = [
                subprocess.Popen(cmd, cwd=project_root(), preexec_fn=_die_with_parent())
                for _ in range(args.workers)
            ]
            try:
                codes = [p.wait() for p in procs]
            except KeyboardInterrupt:  # Ctrl-C reached the workers too; a SIGTERM of this one did not
                deadline = time.monotonic() + 10
                for p in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=max(0.0, deadline - time.monotonic()))
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait()
                raise
            status = 130 if 130 in codes else max(codes)
    except KeyboardInterrupt:
        status = 130
        print("search interrupted: run the same command again to resume it", flush=True)
    study = setup.open()  # every worker's trials
    _finish(setup, study, parent, status)
    complete = _count(study, TrialState.COMPLETE)
    summary = f"search '{setup.name}': {complete}/{setup.n_trials} trials complete"
    if complete:
        best = study.best_trial
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        summary += f"; best {setup.metric} {best.value:.4f} in trial {best.number} ({shown})"
    from medseg_monai.handlers.progress import format_duration

    print(
        f"{summary}; {format_duration(time.perf_counter() - started)}; figure {setup.folder / 'trajectory.png'}",
        flush=True,
    )
    return status


def _overrides(extra: Sequence[str]) -> dict[str, Any]:
    if len(extra) % 2 or any(not k.startswith("--") for k in extra[::2]):
        raise InputError(f"bundle settings come as --key value pairs, got {' '.join(extra)!r}")
    return {k[2:]: _parse_value(v) for k, v in zip(extra[::2], extra[1::2], strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medseg-search",
        description=__doc__.split("\n\n")[0],
        epilog="Other --key value pairs are bundle settings for every trial (e.g. --image_size 128).",
    )
    parser.add_argument("--study", required=True, help="the bundle (bundles/<study>/configs/search.yaml)")
    parser.add_argument("--trials", type=int, help="completed trials in all (default: search.yaml's)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--steps", type=int, help="optimiser steps per trial (default: search.yaml's)")
    parser.add_argument("--profile", default="paper", help="quick (tiny CPU profile) or paper (default)")
    parser.add_argument("--name", default="default", help="the search: its folder and MLflow run")
    parser.add_argument("--experiment", help="an experiment layer of the bundle to search from")
    parser.add_argument("--storage", help="Optuna storage URL or journal file (default: <folder>/optuna.log)")
    parser.add_argument("--spec", help="another search.yaml")
    parser.add_argument("--bundles_dir", help=argparse.SUPPRESS)
    parser.add_argument("--runs_dir", help="default: <repo>/runs")
    parser.add_argument(
        "--max_failures", type=int, default=3, help="a worker stops after this many failed trials"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    try:
        if args.workers < 1:
            raise InputError(f"--workers must be >= 1, got {args.workers}")
        return search(args, _overrides(extra))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
