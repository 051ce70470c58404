"""One trial of a bundle search: a training of the bundle, in a subprocess, with the trial's values as
overrides and enough whole epochs for the search's optimiser steps; its score is the best value of
the search's metric in the training's MLflow run."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna

from medseg_monai.config import at_repo_root, command_line, config_parser
from medseg_monai.paths import project_root
from medseg_monai.search.spec import Parameter, SearchSpec
from medseg_monai.search.storage import open_study
from medseg_monai.search.tracking import tag_trial_run
from medseg_monai.search.worker import TrialFailed, TrialInterrupted
from medseg_monai.tracking import open_client, recorded_run

__all__ = ["BundleTrial", "SearchSetup", "batches_per_epoch", "die_with_parent"]


def batches_per_epoch(files: Sequence[str], overrides: Mapping[str, Any]) -> int:
    """Training batches (optimiser steps) per epoch of the bundle: ``len(train#dataloader)`` as the
    trainer sees it, built with ``cache_rate`` 0 (nothing is cached or preprocessed for counting)."""
    parser = config_parser(files, dict(overrides))
    if "cache_rate" in parser.get():
        parser["cache_rate"] = 0.0
    with at_repo_root():
        return max(1, len(parser.get_parsed_content("train#dataloader")))


_LIBC: Any = None


def die_with_parent() -> Callable[[], None] | None:
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


def best_metric(client: Any, run_id: str, metric: str, direction: str) -> float:
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
class SearchSetup:
    """Everything a search's workers share (built by :func:`medseg_monai.search.cli.prepare`)."""

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
    """The objective of a bundle search: one training of the bundle with the trial's values (see
    :mod:`medseg_monai.search`); the training's MLflow run becomes the parent's child, tagged
    ``search.*``."""

    def __init__(self, setup: SearchSetup, parent_run_id: str | None) -> None:
        self.setup = setup
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.Trial, params: dict[str, Any], out: Path) -> float:
        from medseg_monai.handlers.tracking import PARENT_RUN_ENV  # lazy: handlers import torch and Ignite

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
                preexec_fn=die_with_parent(),
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
                score = best_metric(client, run_id, s.metric, s.direction)
            except TrialFailed as e:
                error = f"{e}; log: {log_path}"
        tag_trial_run(client, s, self.parent_run_id, trial, params, run_id, score, error)
        if error:
            raise TrialInterrupted(error) if interrupted else TrialFailed(error)
        return float(score)
