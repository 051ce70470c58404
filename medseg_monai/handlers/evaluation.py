"""An evaluation's results, all or nothing: the previous results of a split stay as they were until
the new evaluation of that split completes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from medseg_monai.errors import RunInterrupted

__all__ = ["EvaluationResults", "STOP_SIGNALS"]

logger = logging.getLogger(__name__)

# what stops a run cleanly: a scheduler's time limit (SIGTERM), Ctrl-C (SIGINT), a closed terminal or
# a dropped ssh session (SIGHUP, absent on Windows)
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)

LATEST = "metrics.json"  # a copy of the last evaluation that completed, of any split


class EvaluationResults:
    """Keep the previous results of an evaluation of ``split`` in ``output_dir`` until the new one
    completes (attach to the evaluator, before the MLflow tracker).

    What an evaluation of a split writes is ``metrics_<split>.json`` (the study's ``CaseMetrics``),
    ``metrics.json`` (a copy of it, the latest evaluation) and the ``<prefix>*`` files (its record,
    tables and figures). :meth:`set_aside`, called before the evaluation writes its record, copies
    those there are into ``<output_dir>/.<prefix>previous/``. SIGTERM, SIGINT and SIGHUP stop the
    evaluator after the current case (``engine.state.interrupted`` names the signal). On completion
    ``metrics_<split>.json`` is copied to ``metrics.json`` and the copies are dropped; when
    :meth:`run` sees an interruption or an exception, the new files are removed and the copies put
    back, so that the folder holds what it held before. Copies left by a process killed outright
    (kill -9) are put back by the next evaluation before it starts."""

    def __init__(self, output_dir: str, split: str, prefix: str) -> None:
        self.output_dir = Path(output_dir)
        self.split = split
        self.prefix = prefix
        self.metrics_file = self.output_dir / f"metrics_{split}.json"
        self._aside = self.output_dir / f".{prefix}previous"
        self._dropped = self.output_dir / f".{prefix}previous.drop"
        self._previous_signals: dict[int, Any] = {}
        self._engine: Engine | None = None
        self.interrupted: str | None = None  # the signal that stopped the evaluation
        self.had_results = False

    def _written(self) -> list[Path]:
        """The files an evaluation of this split writes that are in the folder now."""
        if not self.output_dir.is_dir():
            return []
        named = [self.output_dir / LATEST, self.metrics_file]
        return [p for p in named if p.is_file()] + sorted(
            p for p in self.output_dir.glob(f"{self.prefix}*") if p.is_file()
        )

    def set_aside(self) -> None:
        """Copy the previous results of this split aside (after putting back any a killed evaluation
        left there), and catch the stop signals from now on: one that comes before the evaluator
        starts stops it at its start."""
        self._catch_signals()
        shutil.rmtree(self._dropped, ignore_errors=True)
        if self._aside.is_dir():
            logger.warning(
                "an evaluation of the %s split in %s did not end (killed?): its previous results are put back",
                self.split,
                self.output_dir,
            )
            self._restore()
        previous = self._written()
        self.had_results = self.metrics_file.is_file()
        if not previous:
            return
        self._aside.mkdir(parents=True)
        for path in previous:
            shutil.copy2(path, self._aside / path.name)

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._stop_if_signalled)
        engine.add_event_handler(Events.COMPLETED, self._commit)

    def run(self, evaluator: Engine) -> None:
        """Run ``evaluator``; when a signal stops it or an exception escapes, the folder gets its
        previous results back, and a signal ends the process with one line, non-zero."""
        try:
            evaluator.run()
        except BaseException:
            self._restore()
            raise
        finally:
            self._restore_signals()
        signal_name = self.interrupted
        if not signal_name:
            return
        self._restore()
        kept = (
            f"the previous results of the {self.split} split in {self.output_dir} are as they were"
            if self.had_results
            else f"nothing of it was kept in {self.output_dir}"
        )
        raise RunInterrupted(
            f"evaluation of the {self.split} split stopped by {signal_name}: {kept}; run the same command "
            "again to evaluate it"
        )

    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: Any) -> None:
            self.interrupted = signal.Signals(signum).name
            logger.warning("%s received: stopping the evaluation after this case", self.interrupted)
            if self._engine is not None:
                self._stop_if_signalled(self._engine)

        self._previous_signals = {s: signal.signal(s, stop) for s in STOP_SIGNALS}

    def _stop_if_signalled(self, engine: Engine) -> None:
        engine.state.interrupted = self.interrupted  # the tracker then ends its own run KILLED
        if self.interrupted:
            engine.terminate(skip_completed=True)  # no COMPLETED: nothing is committed

    def _restore_signals(self) -> None:
        for s, handler in self._previous_signals.items():
            signal.signal(s, handler)
        self._previous_signals = {}

    def _commit(self, engine: Engine) -> None:
        if self.metrics_file.is_file():  # written atomically by CaseMetrics; the copy is atomic too
            tmp = self.output_dir / f".{LATEST}.tmp"
            shutil.copy2(self.metrics_file, tmp)
            os.replace(tmp, self.output_dir / LATEST)
        if self._aside.is_dir():  # dropped in one rename: a kill after it never restores old files
            os.replace(self._aside, self._dropped)
            shutil.rmtree(self._dropped, ignore_errors=True)
        self._restore_signals()  # complete: a signal from now on no longer undoes it

    def _restore(self) -> None:
        """Remove what this evaluation wrote and put the copies back."""
        for path in self._written():
            path.unlink()
        if self._aside.is_dir():
            for path in sorted(self._aside.iterdir()):
                os.replace(path, self.output_dir / path.name)
            self._aside.rmdir()
