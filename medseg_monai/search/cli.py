"""The search's command line: ``python -m medseg_monai.search --study S [--trials N] [--workers K] ...``
runs, resumes or joins the search of a bundle, with one worker here or K worker processes."""

from __future__ import annotations

import argparse
import ast
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from medseg_monai.config import config_files, config_parser
from medseg_monai.errors import InputError, redact
from medseg_monai.paths import project_root
from medseg_monai.search.spec import load_spec
from medseg_monai.search.storage import count_trials
from medseg_monai.search.tracking import ParentMetrics, finish_parent_run, parent_run
from medseg_monai.search.trial import BundleTrial, SearchSetup, die_with_parent
from medseg_monai.search.worker import format_value, run_worker
from medseg_monai.tracking import tracking_uri

__all__ = ["main", "prepare", "search"]

DESCRIPTION = "Hyperparameter search of a bundle: the LV paper's procedure, run on Optuna."


def _parse_value(text: str) -> Any:
    """A ``--key value`` of the command line as the bundle CLI reads it: a Python literal (1e-3,
    [1, 2], True), true/false/null, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)


def prepare(
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
) -> SearchSetup:
    import difflib

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
    return SearchSetup(
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


def _worker_command(setup: SearchSetup, args: argparse.Namespace) -> list[str]:
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


def _work_here(setup: SearchSetup, study: optuna.Study, parent: str | None) -> int:
    """One worker in this process: bundle trials until enough are complete, each score logged into
    the search's parent run when there is one."""
    return run_worker(
        study,
        setup.parameters,
        setup.n_trials,
        setup.folder,
        BundleTrial(setup, parent),
        callbacks=[ParentMetrics(parent)] if parent else [],
        max_failures=setup.max_failures,
        metric=setup.metric,
    )


def search(args: argparse.Namespace, overrides: Mapping[str, Any]) -> int:
    """Run (or resume, or join) the search the command line describes; returns the exit status."""
    setup = prepare(
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
            return _work_here(setup, study, parent)
        except KeyboardInterrupt:
            return 130
    parent = parent_run(setup, study)
    complete = count_trials(study, TrialState.COMPLETE)
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
            status = _work_here(setup, study, parent)
        else:
            cmd = _worker_command(setup, args)
            procs = [
                subprocess.Popen(cmd, cwd=project_root(), preexec_fn=die_with_parent())
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
    finish_parent_run(setup, study, parent, status)
    complete = count_trials(study, TrialState.COMPLETE)
    summary = f"search '{setup.name}': {complete}/{setup.n_trials} trials complete"
    if complete:
        best = study.best_trial
        shown = " ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
        summary += f"; best {setup.metric} {best.value:.4f} in trial {best.number} ({shown})"
    from medseg_monai.handlers.progress import format_duration  # lazy: handlers import torch and Ignite

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
        description=DESCRIPTION,
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
