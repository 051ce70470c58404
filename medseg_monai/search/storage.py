"""Where a search's trials live: the Optuna study on its journal, and the locks and signal mask that
keep several worker processes on one journal consistent."""

from __future__ import annotations

import contextlib
import fcntl
import json
import platform
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from medseg_monai.errors import InputError
from medseg_monai.search.sampler import BestNeighbourhoodSampler
from medseg_monai.search.spec import Parameter

__all__ = ["HOST", "count_trials", "lock_held", "locked", "open_study", "optuna_storage", "signals_held"]

HOST = platform.node()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (blocking): one process at a time claims or recovers trials."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
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


def lock_held(path: Path) -> bool:
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


def optuna_storage(folder: Path, storage: str | None) -> Any:
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
    with locked(folder / "search.lock"):
        study = optuna.create_study(
            study_name=name,
            storage=optuna_storage(folder, storage),
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


def count_trials(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))
