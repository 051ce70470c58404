"""Where a job's seconds go: named phases summed per process, written beside the run's results.

Every ``make reproduce-all`` job writes ``<output_dir>/timings.json``; ``--profile-time`` prints them
per job with the grid's totals. The phases (:data:`PHASES`):

- ``start``: from the launcher starting the process to the job's first line (interpreter, imports);
- ``data``: synthetic data generated (cold cache only) and data lists read;
- ``setup``: the bundle's config parsed, its run record and MLflow run prepared;
- ``cache``: the training and validation ``CacheDataset`` s filled (loading, deterministic transforms);
- ``train``: the training engine's run less the two below;
- ``validation``: the validation engine's runs during training;
- ``evaluation``: ``evaluate.yaml`` on the grid's split, from its config to its metrics file;
- ``mlflow``: time inside the MLflow tracker's handlers (params, metrics, artifacts), both runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["PHASES", "Stopwatch", "time_engine_runs"]

PHASES = ("start", "data", "setup", "cache", "train", "validation", "evaluation", "mlflow")


class Stopwatch:
    """Seconds per named phase; a phase entered several times adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(seconds, 0.0)

    def write(self, path: str | Path, **extra: Any) -> None:
        data = {"seconds": {k: round(v, 3) for k, v in self.seconds.items()}, **extra}
        Path(path).write_text(json.dumps(data, indent=1))


def time_engine_runs(engine: Any, stopwatch: Stopwatch, name: str) -> None:
    """Add every completed run of the Ignite ``engine`` to ``name`` (no ``EXCEPTION_RAISED``
    handler: registering one would stop Ignite from re-raising the engine's errors)."""
    from ignite.engine import Events

    started: list[float] = []

    def start(_: Any) -> None:
        started.append(time.perf_counter())

    def stop(_: Any) -> None:
        if started:
            stopwatch.add(name, time.perf_counter() - started.pop())

    engine.add_event_handler(Events.STARTED, start)
    engine.add_event_handler(Events.COMPLETED, stop)
