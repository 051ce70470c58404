"""Interrupted trainings: checkpoint everything after every epoch, stop cleanly on SIGTERM/SIGINT/SIGHUP,
and continue from the last checkpoint (``--resume true``) as if the run had never stopped."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable, Transform

from medseg_monai.errors import InputError
from medseg_monai.handlers.evaluation import STOP_SIGNALS

__all__ = ["TrainingCheckpoint", "random_states"]

logger = logging.getLogger(__name__)

_SIGNALS = STOP_SIGNALS  # SIGTERM, SIGINT and SIGHUP (a closed terminal, a dropped ssh session)


def _walked(value: Any) -> bool:
    """Whether the walk of :func:`_randomizables` goes into ``value``: a MONAI transform (random or
    not: ``Compose``, ``OneOf``, a dictionary transform around an array one, ...) or a data set."""
    return isinstance(value, (Transform, Randomizable, torch.utils.data.Dataset))


def _randomizables(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """Every object with its own random state (``R``) that ``obj`` holds, in a fixed order: ``obj``
    itself, then, depth first in attribute order, every transform and data set among its attributes
    and in the lists, tuples and dicts they hold. That reaches the inner transforms a random transform
    draws from (``RandRotated``'s ``RandRotate``, ``RandAffined``'s ``RandAffine`` and its
    ``RandAffineGrid``, ``RandCropByPosNegLabeld``'s cropper), those of ``OneOf``/``RandomOrder`` and of
    a ``Compose`` inside a ``Compose``, a data set's ``transform``, and the data set a wrapper draws its
    items from (e.g. a ``medseg_monai.data.AddedCopiesDataset`` over a ``Dataset``)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(getattr(obj, "R", None), np.random.RandomState):
        yield obj
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(value, (list, tuple)):
            children = [v for v in value if _walked(v)]  # a cache's items are not walked into
        elif isinstance(value, dict):
            children = [v for v in value.values() if _walked(v)]
        else:
            children = [value] if _walked(value) else []
        for child in children:
            yield from _randomizables(child, seen)


def random_states(datasets: list[Any]) -> dict[str, Any]:
    """Every random number generator a training draws from: Python's, NumPy's, torch's (and CUDA's)
    global ones, and the random state of each random transform of ``datasets`` (with its class name,
    so that a checkpoint of another transform chain is recognised)."""
    transforms = [t for ds in datasets for t in _randomizables(ds)]
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "transforms": [t.R.get_state() for t in transforms],
        "transform_names": [type(t).__name__ for t in transforms],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _plain(value: Any) -> Any:
    """``value`` with NumPy arrays as tensors and NumPy scalars as Python numbers: what
    ``torch.load(weights_only=True)`` reads without unpickling code (a NumPy generator's state holds
    a uint32 array, kept as int64)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _numpy_state(state: Any) -> tuple[Any, ...]:
    """A NumPy generator state as saved by :func:`_plain` (keys as a tensor), as NumPy takes it."""
    name, keys, *rest = state
    return (name, np.asarray(keys, dtype=np.uint32), *rest)


def _set_random_states(states: Mapping[str, Any], datasets: list[Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(_numpy_state(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    transforms = [t for ds in datasets for t in _randomizables(ds)]
    names = [type(t).__name__ for t in transforms]
    if "transform_names" not in states:
        raise InputError(
            "the checkpoint holds the random states of the outer transforms only (written before inner "
            "ones such as RandRotated's RandRotate were saved too), so it cannot be resumed exactly: "
            "start the run again (--overwrite true)"
        )
    if names != list(states["transform_names"]):
        pairs = zip(states["transform_names"], names, strict=False)
        counts = f"{len(states['transform_names'])} there, {len(names)} here"
        first = next((f"{a} there, {b} here" for a, b in pairs if a != b), counts)
        raise InputError(
            f"the checkpoint's random transforms differ from this training's ({first}): resume with the "
            "configuration the run started with"
        )
    for t, state in zip(transforms, states["transforms"], strict=True):
        t.R.set_state(_numpy_state(state))


def _unsafe_globals(path: Path) -> str:
    """What a checkpoint needs beyond tensors and plain values (read without unpickling it)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: torch's reader says no more than that
        names = []
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "") or "objects"


def _write_error(path: Path, error: BaseException, epoch: int) -> InputError | None:
    """One line for a checkpoint that could not be written: a full disk says "no space left" and how
    much is free; the last complete checkpoint, if any, stays what ``--resume true`` continues from."""
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
    full = getattr(error, "errno", None) == errno.ENOSPC or free < (1 << 20)
    if not full and not isinstance(error, OSError):
        return None
    what = "no space left on the device" if full else f"cannot write it ({error})"
    last = (
        f"epoch {epoch - 1}'s checkpoint is kept: free space, then --resume true"
        if path.is_file()
        else "no epoch was checkpointed: free space, then run the same command again"
    )
    return InputError(f"{path} after epoch {epoch}: {what} ({free // (1 << 20)} MB free); {last}")


class TrainingCheckpoint:
    """Make a training resumable and interruptible (attach to the trainer, after every other handler).

    After every epoch (after validation, LR stepping and the best-model checkpoint) it writes
    ``<output_dir>/checkpoint.pt``: the state of ``objects`` (network, optimiser, LR scheduler,
    the best-model saver), the trainer's epoch and iteration, the evaluator's best metric, AMP's
    gradient scaler and every random state (:func:`random_states` of ``datasets``), atomically.
    With ``resume`` it loads that file when the trainer starts, so the run continues at the next
    epoch, drawing the same random numbers as an uninterrupted run would.

    From the moment it is attached, SIGTERM (what SLURM sends at a time limit), SIGINT (Ctrl-C) and
    SIGHUP (a closed terminal) end the current iteration and stop the run
    (``engine.state.interrupted`` names the signal; trackers mark their run KILLED);
    :func:`medseg_monai.runtime.check_interrupted` then ends the process with one line and a
    non-zero status. The last complete epoch's checkpoint is what ``--resume true`` continues from.
    """

    def __init__(
        self,
        output_dir: str,
        objects: Mapping[str, Any],
        datasets: list[Any] | None = None,
        evaluator: Engine | None = None,
        resume: bool = False,
        filename: str = "checkpoint.pt",
    ) -> None:
        self.path = Path(output_dir) / filename
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self.datasets = list(datasets or [])
        self.evaluator = evaluator
        self.resume = resume
        self._previous: dict[int, Any] = {}
        self._received: str | None = None

    def attach(self, engine: Engine) -> None:
        # the signals are caught from here on, not from STARTED: the handlers attached before this
        # one (the tracker opening its MLflow run) run first at STARTED, and a Ctrl-C there was a
        # KeyboardInterrupt with a traceback and a run left RUNNING
        self._catch_signals(engine)
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)
        engine.add_event_handler(Events.TERMINATE, self._restore_signals)
        engine.add_event_handler(Events.COMPLETED, self._restore_signals)

    def _all_objects(self, engine: Engine) -> dict[str, Any]:
        # MONAI's CheckpointSaver keeps its best-model list in an Ignite Checkpoint, which has the state
        objects = {k: getattr(v, "_key_metric_checkpoint", None) or v for k, v in self.objects.items()}
        objects["trainer"] = engine
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            objects["scaler"] = scaler
        return objects

    def _catch_signals(self, engine: Engine) -> None:
        self._received = None
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return

        def stop(signum: int, frame: Any) -> None:
            self._received = engine.state.interrupted = signal.Signals(signum).name
            logger.warning("%s received: stopping after this iteration", self._received)
            engine.terminate(skip_completed=True)  # Ignite clears it when run() starts: _start repeats it

        self._previous = {s: signal.signal(s, stop) for s in _SIGNALS}

    def _start(self, engine: Engine) -> None:
        if not self._previous:  # a second run() of this trainer: the first one's end restored them
            self._catch_signals(engine)
        if self.resume:
            self._load(engine)
        engine.state.interrupted = self._received
        if self._received:  # received before the trainer ran or while earlier STARTED handlers ran
            engine.terminate(skip_completed=True)

    def _load(self, engine: Engine) -> None:
        if not self.path.is_file():
            raise InputError(
                f"nothing to resume: no checkpoint at {self.path} (the run saves one after every epoch)"
            )
        try:  # tensors and plain values only: unpickling anything else would run code from the file
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InputError(
                f"{self.path} holds {_unsafe_globals(self.path)}, which only code from the file could "
                "rebuild: refused (this suite's checkpoints hold tensors and plain values; to start the "
                "run again: --overwrite true)"
            ) from None
        max_epochs = engine.state.max_epochs
        for name, obj in self._all_objects(engine).items():
            if name not in state["objects"]:
                raise InputError(
                    f"{self.path} has no '{name}' state: resume with the configuration the run started with"
                )
            obj.load_state_dict(state["objects"][name])
        engine.state.max_epochs = max_epochs  # a resumed run may be given more epochs
        if self.evaluator is not None:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        _set_random_states(state["random"], self.datasets)
        logger.info("resuming %s after epoch %d of %d", self.path.parent, engine.state.epoch, max_epochs)

    def _save(self, engine: Engine) -> None:
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() > 0
        ):
            return  # every rank holds the same state under DDP: rank 0 writes it
        state = {
            "objects": {name: obj.state_dict() for name, obj in self._all_objects(engine).items()},
            "best_metric": getattr(self.evaluator.state, "best_metric", None) if self.evaluator else None,
            "best_metric_epoch": getattr(self.evaluator.state, "best_metric_epoch", None)
            if self.evaluator
            else None,
            "random": random_states(self.datasets),
        }
        state = _plain(state)  # what resuming reads with weights_only=True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
            tmp.unlink(missing_ok=True)  # never a half-written checkpoint beside the last good one
            problem = _write_error(self.path, e, engine.state.epoch)
            if problem is None:
                raise  # not a write problem: torch's own error and traceback
            raise problem from e

    def _restore_signals(self, engine: Engine) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
