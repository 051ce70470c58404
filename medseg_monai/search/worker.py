"""A search's worker: takes trials one by one from the shared study until enough are complete, and
recovers those that a killed worker left running."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from medseg_monai.search.spec import Parameter
from medseg_monai.search.storage import HOST, count_trials, lock_held, locked, signals_held
from medseg_monai.search.tracking import tag_abandoned
from medseg_monai.tracking import RUN_RECORD, mark_stale_run

__all__ = ["TrialFailed", "TrialInterrupted", "format_value", "run_worker"]


class TrialFailed(Exception):
    """A trial's training failed or gave no score: the message is one line (with the log's path)."""


class TrialInterrupted(TrialFailed):
    """A trial's training was stopped by a signal (SIGINT, SIGTERM): not the candidate's fault, so
    its parameters are queued again."""


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
        if t.user_attrs.get("host", HOST) != HOST:
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
        if lock_held(trial_dir / ".worker.lock") or lock_held(trial_dir / ".lock"):
            continue  # a live worker, or its training still stopping
        if (trial_dir / RUN_RECORD).is_file():  # best effort: the old training's MLflow run
            with contextlib.suppress(Exception):
                mark_stale_run(trial_dir)
        tag_abandoned(study, t.number, trial_dir, t.params, "its worker was gone (killed?)")
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
    with signals_held(), locked(folder / "search.lock"):
        _recover_stale(study, folder, say)
        if count_trials(study, TrialState.COMPLETE) + count_trials(study, TrialState.RUNNING) >= n_trials:
            return None
        trial = study.ask()
        params = {p.name: p.suggest(trial) for p in parameters}
        trial_dir = folder / f"trial{trial.number}"
        if trial_dir.exists():  # left by a deleted study of the same name: trial numbers are unique
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        lock = (trial_dir / ".worker.lock").open("a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"pid {os.getpid()} on {HOST}\n")
        lock.flush()
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("output_dir", str(trial_dir))
        return _Claim(trial, params, trial_dir, lock)


def format_value(value: Any) -> str:
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
        shown = " ".join(f"{k}={format_value(v)}" for k, v in claim.params.items())
        retry = trial.user_attrs.get("retry_of")
        error, requeued = None, False
        try:  # the trial is told before its folder's lock goes: never seen running without a worker
            value = float(objective(trial, claim.params, claim.folder))
            if not math.isfinite(value):
                raise TrialFailed(f"{metric} is {value}")
        except (KeyboardInterrupt, SystemExit, TrialInterrupted) as e:
            with signals_held(), locked(folder / "search.lock"):
                trial.set_user_attr("error", f"interrupted: {e}"[:500])
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                study.enqueue_trial(claim.params, user_attrs={"retry_of": trial.number})
                say(f"trial {trial.number} interrupted: marked FAIL, its parameters queued again")
            tag_abandoned(study, trial.number, claim.folder, claim.params, "interrupted")
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
        done = count_trials(study, TrialState.COMPLETE)
        again = f" (retry of {retry})" if retry is not None else ""
        say(
            f"[{done}/{n_trials}] trial {trial.number}{again}: {shown} -> {metric} {value:.4f}; "
            f"best {best.value:.4f} (trial {best.number}); {time.perf_counter() - started:.0f} s"
        )
