"""``make reproduce-all``: every bundle's experiment grid, train then evaluate, resumable.

Each bundle declares its grid in ``configs/reproduce.yaml`` (experiments, seeds per profile,
the paper's numbers, figures); this module only runs it. For every (study, experiment, seed)
it trains and evaluates in one subprocess (``python -m medseg_monai.reproduce --job``), streams
progress (run k of n, epoch, ETA), and marks the MLflow run with what the report needs. A run
already FINISHED for the same commit, merged-config hash and data hash is skipped unless
``force``; a failed run is recorded FAILED, the others go on, and the exit status names the
failures. The report is rebuilt at the end (``medseg_monai.report``).

    python -m medseg_monai.reproduce [--profile quick|paper] [--studies wmh xray] [--seeds 0 1] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg_monai.bundle import config_files, config_parser
from medseg_monai.data import DatasetError, get_dataset, resolve_data_root
from medseg_monai.errors import InputError
from medseg_monai.handlers.progress import format_duration
from medseg_monai.paths import project_root
from medseg_monai.record import content_hash, git_state
from medseg_monai.tracking import ensure_experiment, recorded_run, run_tags, tracking_uri

__all__ = ["Job", "load_grid", "main", "plan", "reproduce"]

PROFILES = ("quick", "paper")
_EPOCH = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete")


@dataclass
class Job:
    """One (study, experiment, seed) of a grid, with everything needed to run and to skip it."""

    study: str
    experiment: str
    seed: int
    profile: str
    configs: list[str]
    split: str
    output_dir: str
    paper: dict[str, float] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    metrics: list[str] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""

    @property
    def label(self) -> str:
        return f"{self.study}/{self.experiment} seed {self.seed}"

    def bundle_args(self) -> dict[str, Any]:
        return {**self.overrides, "seed": self.seed, "output_dir": self.output_dir}


def _entries(spec: dict[str, Any], spec_path: Path) -> list[dict[str, Any]]:
    """The grid's experiments, sweeps expanded: an entry with ``sweep: {param: [v1, v2, ...]}`` is one
    experiment per value, named ``<name>_<value>`` (zero-padded to 3 digits for integers), run with
    ``param`` overridden and the paper's numbers of that value (``paper: {value: {metric: x}}``)."""
    out = []
    for exp in spec["experiments"]:
        sweep = exp.get("sweep")
        if not sweep:
            out.append({**exp, "overrides": dict(exp.get("overrides", {}))})
            continue
        if len(sweep) != 1 or not isinstance(next(iter(sweep.values())), list):
            raise DatasetError(
                f"{spec_path}: sweep '{exp['name']}' must name one parameter and its list of values"
            )
        (param, values), paper = next(iter(sweep.items())), exp.get("paper", {})
        for value in values:
            name = f"{exp['name']}_{value:03d}" if isinstance(value, int) else f"{exp['name']}_{value}"
            out.append(
                {
                    **{k: v for k, v in exp.items() if k not in ("sweep", "paper")},
                    "name": name,
                    "paper": paper.get(value, {}),
                    "sweep": {param: value},
                    "overrides": {**exp.get("overrides", {}), param: value, "experiment": name},
                }
            )
    return out


def load_grid(
    bundle: Path, profile: str, seeds: list[int] | None = None, runs_dir: Path | None = None
) -> list[Job]:
    """The jobs of one bundle's ``configs/reproduce.yaml`` for ``profile``; config files come from the
    launcher (``medseg_monai.bundle.config_files``): train.yaml, the experiment, the profile."""
    spec_path = bundle / "configs" / "reproduce.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    if profile not in spec.get("seeds", {}):
        raise DatasetError(
            f"{spec_path}: no seeds for profile '{profile}' (profiles: {', '.join(spec.get('seeds', {}))})"
        )
    study = spec["study"]
    seed_list = seeds if seeds is not None else spec["seeds"][profile]
    runs = runs_dir or project_root() / "runs" / "reproduce"
    jobs = []
    for exp in _entries(spec, spec_path):
        try:
            files = config_files(
                study, "train", exp.get("config", exp["name"]), profile, bundles_dir=bundle.parent
            )
        except InputError as e:
            raise DatasetError(f"{spec_path}: experiment '{exp['name']}': {e}") from None
        for seed in seed_list:
            jobs.append(
                Job(
                    study=study,
                    experiment=exp["name"],
                    seed=int(seed),
                    profile=profile,
                    configs=files,
                    split=exp.get("split", spec.get("split", "val")),
                    output_dir=str(runs / profile / study / exp["name"] / f"seed{seed}"),
                    paper=dict(exp.get("paper", {})),
                    sweep=dict(exp.get("sweep", {})),
                    note=exp.get("note", ""),
                    metrics=list(spec.get("metrics", ["dice"])),
                    figures=list(spec.get("figures", [])),
                    overrides=exp["overrides"],
                    init_from=exp.get("init_from", ""),
                )
            )
    return _chain(jobs, spec_path)


def _chain(jobs: list[Job], spec_path: Path) -> list[Job]:
    """Jobs of an entry with ``init_from: <entry>`` start from that entry's best model of the same
    seed (``pretrained_ckpt``), as the thesis fine-tuned one experiment's weights in the next; every
    parent is ordered before its children (otherwise the grid's order is kept)."""
    by_key = {(j.experiment, j.seed): j for j in jobs}
    for job in jobs:
        if not job.init_from:
            continue
        parent = by_key.get((job.init_from, job.seed))
        if parent is None:
            raise DatasetError(
                f"{spec_path}: '{job.experiment}' starts from '{job.init_from}', no such entry"
            )
        job.overrides = {**job.overrides, "pretrained_ckpt": str(Path(parent.output_dir) / "model.pt")}
    ordered: list[Job] = []

    def place(job: Job, seen: tuple[str, ...] = ()) -> None:
        if job in ordered:
            return
        if job.experiment in seen:
            raise DatasetError(f"{spec_path}: init_from cycle through '{job.experiment}'")
        if job.init_from:
            place(by_key[(job.init_from, job.seed)], (*seen, job.experiment))
        ordered.append(job)

    for job in jobs:
        place(job)
    return ordered


def plan(
    profile: str = "quick",
    studies: list[str] | None = None,
    seeds: list[int] | None = None,
    bundles_dir: Path | None = None,
    runs_dir: Path | None = None,
) -> list[Job]:
    """Jobs of every bundle under ``bundles_dir`` with a ``configs/reproduce.yaml`` (or of ``studies``)."""
    root = bundles_dir or project_root() / "bundles"
    found = {p.parent.parent.name: p.parent.parent for p in sorted(root.glob("*/configs/reproduce.yaml"))}
    unknown = [s for s in studies or [] if s not in found]
    if unknown:
        raise DatasetError(f"no reproducible bundle '{unknown[0]}' under {root} (have: {', '.join(found)})")
    return [j for s in studies or list(found) for j in load_grid(found[s], profile, seeds, runs_dir)]


def fingerprint(job: Job) -> dict[str, str]:
    """Merged-config hash, dataset id and data hash: what decides whether a finished run still counts."""
    parser = config_parser(job.configs, job.bundle_args())
    config = dict(parser.get())
    config.pop("output_dir", None)  # where a run writes does not change what it computes
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    dataset = parser.get_parsed_content("dataset")
    data_root = parser.get_parsed_content("data_root")
    start = config.get("pretrained_ckpt")
    if job.init_from and start and Path(start).is_file():  # a retrained parent makes its children stale
        digest = hashlib.sha256((digest + content_hash([Path(start)])).encode()).hexdigest()[:16]
    return {
        "config_hash": digest,
        "dataset": dataset,
        "data_root": str(resolve_data_root(dataset, data_root)),
        "data_hash": content_hash([resolve_data_root(dataset, data_root)]),
        "max_epochs": str(parser.get_parsed_content("max_epochs")),
    }


def _finished_run(client: Any, job: Job, fp: dict[str, str], commit: str) -> str | None:
    exp = client.get_experiment_by_name(job.study)
    if exp is None:
        return None
    query = (
        f"tags.`reproduce.config_hash` = '{fp['config_hash']}' and tags.`dataset.hash` = '{fp['data_hash']}' "
        f"and tags.`git.commit` = '{commit}' and tags.`reproduce.status` = 'complete' "
        f"and attributes.status = 'FINISHED'"
    )
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def _job_tags(job: Job, fp: dict[str, str]) -> dict[str, str]:
    tags = {
        "reproduce.config_hash": fp["config_hash"],
        "reproduce.profile": job.profile,
        "reproduce.split": job.split,
        "reproduce.metrics": ",".join(job.metrics),
        "reproduce.figures": json.dumps(job.figures),
        "reproduce.note": job.note,
        "variant": job.experiment,
        "seed": str(job.seed),
        "study": job.study,
    }
    tags.update({f"paper.{k}": str(v) for k, v in job.paper.items()})
    tags.update({f"reproduce.sweep.{k}": str(v) for k, v in job.sweep.items()})
    return tags


def _record_failure(client: Any, job: Job, fp: dict[str, str] | None, error: str) -> str:
    """Mark the job's run FAILED, creating one when the failure came before the run existed."""
    run_id = recorded_run(job.output_dir)
    if run_id is None:
        tags = {"mlflow.runName": f"{job.experiment} seed{job.seed}", "profile": job.profile, **git_state()}
        if fp is not None:
            spec = get_dataset(fp["dataset"])
            tags.update(run_tags(spec.id, spec.kind, [fp["data_root"]], job.profile))
        run_id = client.create_run(ensure_experiment(job.study, client), tags=tags).info.run_id
    client.set_tag(run_id, "reproduce.status", "failed")
    client.set_tag(run_id, "reproduce.error", error[-4000:])
    for key, value in _job_tags(job, fp or {"config_hash": "unknown"}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status="FAILED")
    return run_id


def _run_subprocess(
    job: Job, index: int, total: int, started: float, durations: list[float], max_epochs: int
) -> tuple[int, str]:
    """Train + evaluate ``job`` in a subprocess; print one progress line per epoch; return (status, log tail)."""
    out = Path(job.output_dir)
    if out.exists():
        shutil.rmtree(out)  # a rerun starts clean: no stale model or run record
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "medseg_monai.reproduce", "--job", json.dumps(job.__dict__)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    log_lines: list[str] = []
    job_start = time.perf_counter()
    with (
        (out / "reproduce.log").open("w") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=project_root()
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log_lines.append(line.rstrip())
            del log_lines[:-40]
            m = _EPOCH.search(line)
            if m:
                epoch = int(m.group(1))
                elapsed = time.perf_counter() - job_start
                this_left = elapsed / epoch * max(max_epochs - epoch, 0)
                per_job = (sum(durations) / len(durations)) if durations else elapsed / epoch * max_epochs
                eta = this_left + per_job * (total - index)
                print(
                    f"[{index}/{total}] {job.label}: epoch {epoch}/{max_epochs}, "
                    f"elapsed {format_duration(time.perf_counter() - started)}, ETA {format_duration(eta)}",
                    flush=True,
                )
        status = proc.wait()
    durations.append(time.perf_counter() - job_start)
    return status, "\n".join(log_lines)


def reproduce(
    profile: str = "quick",
    studies: list[str] | None = None,
    seeds: list[int] | None = None,
    force: bool = False,
    bundles_dir: Path | None = None,
    runs_dir: Path | None = None,
    report: bool = True,
) -> int:
    """Run the grid; returns the exit status (1 when any job failed)."""
    from mlflow.tracking import MlflowClient

    jobs = plan(profile, studies, seeds, bundles_dir, runs_dir)
    client = MlflowClient(tracking_uri=tracking_uri())
    commit = git_state()["git.commit"]
    print(
        f"reproduce ({profile}): {len(jobs)} runs of {', '.join(dict.fromkeys(j.study for j in jobs))}; "
        f"tracking {tracking_uri()}",
        flush=True,
    )
    started, durations, failures, skipped = time.perf_counter(), [], [], 0
    for index, job in enumerate(jobs, 1):
        fp = None
        try:
            fp = fingerprint(job)
            done = None if force else _finished_run(client, job, fp, commit)
            if done:
                skipped += 1
                print(
                    f"[{index}/{len(jobs)}] {job.label}: done already (run {done[:8]}), skipped", flush=True
                )
                continue
            print(
                f"[{index}/{len(jobs)}] {job.label}: training on {fp['dataset']} -> {job.output_dir}",
                flush=True,
            )
            status, tail = _run_subprocess(job, index, len(jobs), started, durations, int(fp["max_epochs"]))
            if status != 0:
                raise RuntimeError(
                    next((ln for ln in reversed(tail.splitlines()) if ln.startswith("error:")), tail)
                )
            run_id = recorded_run(job.output_dir)
            if run_id is None:
                raise RuntimeError(f"the job ended without an MLflow run recorded in {job.output_dir}")
            for key, value in _job_tags(job, fp).items():
                client.set_tag(run_id, key, value)
            client.set_tag(run_id, "reproduce.status", "complete")
            print(f"[{index}/{len(jobs)}] {job.label}: finished (run {run_id[:8]})", flush=True)
        except Exception as e:  # one failed run must not stop the grid
            message = str(e).strip() or type(e).__name__
            run_id = _record_failure(client, job, fp, message)
            failures.append(f"{job.label} (run {run_id[:8]}): {message.splitlines()[-1][:300]}")
            print(f"[{index}/{len(jobs)}] {job.label}: FAILED: {message.splitlines()[-1][:300]}", flush=True)
    print(
        f"reproduce: {len(jobs) - skipped - len(failures)} ran, {skipped} skipped, {len(failures)} failed "
        f"in {format_duration(time.perf_counter() - started)}",
        flush=True,
    )
    if report:
        from medseg_monai.report import build_report

        print(f"report: {build_report()}", flush=True)
    if failures:
        print("failed runs:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _run_job(spec: str) -> int:
    """Subprocess body: train, then evaluate, the job given as JSON (one interpreter, two bundle runs)."""
    from medseg_monai.bundle import install_error_hook, run

    install_error_hook()
    job = Job(**json.loads(spec))
    run(job.configs, **job.bundle_args())
    evaluate = str(Path(job.configs[0]).with_name("evaluate.yaml"))
    run([*job.configs, evaluate], split=job.split, **job.bundle_args())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument(
        "--studies", nargs="*", help="bundles to run (default: every bundle with a reproduce.yaml)"
    )
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default: the grid's for the profile)")
    parser.add_argument("--force", action="store_true", help="rerun runs that are already done")
    parser.add_argument("--bundles_dir", type=Path)
    parser.add_argument("--runs_dir", type=Path)
    parser.add_argument("--no_report", action="store_true")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        return _run_job(args.job)
    try:
        return reproduce(
            args.profile,
            args.studies,
            args.seeds,
            args.force,
            args.bundles_dir,
            args.runs_dir,
            not args.no_report,
        )
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
