"""``make reproduce-all``: every bundle's experiment grid, train then evaluate, resumable.

Each bundle declares its grid in ``configs/reproduce.yaml`` (experiments, seeds per profile,
the paper's numbers, figures); this module only runs it. Every (study, experiment, seed) trains
and evaluates in one process of its own, forked from a server that imported torch, MONAI and
MLflow once; ``--jobs`` of them run at once (default: quick jobs one per core up to 4, each on one
thread; paper jobs one at a time on every core), a fine-tuning entry after its parent. Progress
(run k of n, epoch, ETA) is streamed, and the MLflow run is marked with what the report needs. A run
already FINISHED for the same commit, entry, merged-config hash, split and data hash is skipped unless
``force``; an entry whose effective config equals another's (all but its name) is not run twice,
its twin's run is copied; a failed run is recorded FAILED, the others go on, and the exit status
names the failures. Two grids started together share the work: a grid locks a job's folder (a
``.seed<k>.grid.lock`` beside it) before it reads or deletes anything there, and waits, saying so in
one line, for a job another grid holds (then skips it when that grid finished it). Each job writes ``timings.json`` (``medseg_monai.timing``); ``--profile-time``
prints them. The report is rebuilt at the end (``medseg_monai.report``).

    python -m medseg_monai.reproduce [--profile quick|paper] [--studies wmh xray] [--seeds 0 1]
        [--force] [--jobs N] [--profile-time]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import re
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medseg_monai.bundle import run
from medseg_monai.config import config_files, config_parser, run_name
from medseg_monai.data import DatasetError, get_dataset, resolve_data_root, resolve_data_roots
from medseg_monai.errors import InputError
from medseg_monai.handlers.progress import format_duration
from medseg_monai.launch import LAUNCHERS, SlurmSettings, make_launcher, redirect_output
from medseg_monai.mlflow_assets import log_inputs_retrying
from medseg_monai.paths import project_root
from medseg_monai.record import content_hash, cpu_description, git_state, run_tags, torch_threads, try_lock
from medseg_monai.report import build_report
from medseg_monai.runtime import install_error_hook
from medseg_monai.tables import load_references
from medseg_monai.timing import PHASES, Stopwatch
from medseg_monai.tracking import (
    check_tracking_uri,
    ensure_experiment,
    journal,
    open_client,
    record_run,
    recorded_run,
    redact,
    server_answers,
    tracking_uri,
)

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
    order: int = 0  # the entry's place in the grid (the paper's order), for the report's rows
    references: list[dict[str, Any]] = field(default_factory=list)  # the grid's reference rows

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
    launcher (``medseg_monai.config.config_files``): train.yaml, the experiment, the profile."""
    spec_path = bundle / "configs" / "reproduce.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    if profile not in spec.get("seeds", {}):
        raise DatasetError(
            f"{spec_path}: no seeds for profile '{profile}' (profiles: {', '.join(spec.get('seeds', {}))})"
        )
    study = spec["study"]
    references = [asdict(r) for r in load_references(spec, spec_path)]
    seed_list = seeds if seeds is not None else spec["seeds"][profile]
    runs = runs_dir or project_root() / "runs" / "reproduce"
    jobs = []
    for order, exp in enumerate(_entries(spec, spec_path)):
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
                    order=order,
                    references=references,
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


def fingerprint(job: Job, stopwatch: Stopwatch | None = None) -> dict[str, str]:
    """Merged-config hash, dataset id and data hash: what decides whether a finished run still counts.
    ``effective_hash`` leaves out the entry's name too: two entries with the same one train the same
    model (e.g. a sweep value equal to the default), so the grid trains one and copies it to the
    other (and evaluates the copy when its split differs).
    Synthetic data are generated here on first use (timed as ``data``)."""
    watch = stopwatch or Stopwatch()
    parser = config_parser(job.configs, job.bundle_args())
    config = dict(parser.get())
    config.pop("output_dir", None)  # where a run writes does not change what it computes

    def digest(cfg: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    config_hash, effective = digest(config), digest({k: v for k, v in config.items() if k != "experiment"})
    dataset = parser.get_parsed_content("dataset")
    with watch("data"):
        root = resolve_data_root(dataset, parser.get_parsed_content("data_root"))
    start = config.get("pretrained_ckpt")
    if job.init_from and start and Path(start).is_file():  # a retrained parent makes its children stale
        parent = content_hash([Path(start)])
        config_hash, effective = (
            hashlib.sha256((h + parent).encode()).hexdigest()[:16] for h in (config_hash, effective)
        )
    data_hash = content_hash([root])
    return {
        "config_hash": config_hash,
        "effective_hash": f"{job.study}:{effective}:{data_hash}",
        "dataset": dataset,
        "data_root": str(root),
        "data_hash": data_hash,
        "max_epochs": str(parser.get_parsed_content("max_epochs")),
    }


def _finished_run(client: Any, job: Job, fp: dict[str, str], commit: str) -> str | None:
    exp = client.get_experiment_by_name(job.study)
    if exp is None:
        return None
    query = (
        f"tags.`reproduce.config_hash` = '{fp['config_hash']}' and tags.`dataset.hash` = '{fp['data_hash']}' "
        f"and tags.`variant` = '{job.experiment}' and tags.`reproduce.split` = '{job.split}' "
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
        "reproduce.order": str(job.order),
        "reproduce.references": json.dumps(job.references),
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


def _copy_run(client: Any, source_id: str, source: Job, job: Job) -> str:
    """Record ``job`` as a copy of the finished run ``source_id`` of ``source`` (same effective config):
    its output folder copied, a new MLflow run with the source's params, tags, metric histories,
    dataset inputs and logged model (the UI's Dataset and Models columns), tagged
    ``reproduce.same_as``."""
    from mlflow.entities import Metric, Param

    out = Path(job.output_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source.output_dir, out)
    src = client.get_run(source_id)
    # the entry's own grid tags (paper figures, note, sweep) are set afterwards, not the twin's
    own = ("mlflow.", "paper.", "reproduce.")
    tags = {k: v for k, v in src.data.tags.items() if not k.startswith(own)}
    tags |= {
        "mlflow.runName": run_name(job.experiment, job.seed, job.profile),
        "output_dir": str(out),
        "variant": job.experiment,
        "reproduce.same_as": source_id,
    }
    run_id = client.create_run(src.info.experiment_id, tags=tags).info.run_id
    params = [Param(k, v) for k, v in src.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    history = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in src.data.metrics
        for m in client.get_metric_history(source_id, key)
    ]
    for i in range(0, len(history), 1000):
        client.log_batch(run_id, metrics=history[i : i + 1000])
    if src.inputs and src.inputs.dataset_inputs:
        log_inputs_retrying(lambda: client.log_inputs(run_id, datasets=src.inputs.dataset_inputs))
    if src.outputs and src.outputs.model_outputs:  # the same model: trained once, by the source run
        client.log_outputs(run_id, models=src.outputs.model_outputs)
    client.set_terminated(run_id, status="FINISHED")
    record_run(out, run_id, job.study)
    return run_id


def _job_lock_path(job: Job) -> Path:
    """The file a grid locks while it owns ``job``'s folder: beside the folder (``.seed0.grid.lock``
    next to ``seed0/``), so that deleting the folder for a rerun never deletes the lock."""
    out = Path(job.output_dir)
    return out.parent / f".{out.name}.grid.lock"


def take_job_lock(job: Job) -> tuple[Any | None, str]:
    """This grid's exclusive lock on ``job``'s folder, taken before anything looks at or deletes it:
    ``(handle, "")`` when taken (closing the handle, or this process ending, lets go), ``(None,
    holder)`` while another grid holds it (``holder`` says which: pid and host)."""
    return try_lock(_job_lock_path(job), holder="grid pid", unknown="another grid")


def default_workers(profile: str) -> int:
    """Jobs at once when ``--jobs`` is not given: quick jobs are small and scale badly over threads,
    so one per core (at most 4); a paper job gets every core to itself."""
    return 1 if profile == "paper" else max(1, min(4, os.cpu_count() or 1))


@dataclass
class _Slot:
    """A job being run: its launcher handle, reader thread and what its progress lines need."""

    job: Job
    index: int
    fp: dict[str, str]
    handle: Any  # medseg_monai.launch: alive(), wait(), logs
    started: float
    max_epochs: int
    tail: list[str] = field(default_factory=list)


class _Grid:
    """Runs a planned grid: up to ``workers`` jobs at once through ``launcher`` (each on ``threads``
    CPU threads), a child after its ``init_from`` parent, a job equal to another (``effective_hash``)
    copied from it, a job already done skipped. Progress lines come from the main thread, fed by one
    reader thread per job, which follows the job's ``reproduce.log``."""

    def __init__(
        self, jobs: list[Job], force: bool, workers: int, threads: int, profile_time: bool, launcher: Any
    ) -> None:
        self.jobs, self.force, self.workers, self.threads = jobs, force, workers, threads
        self.launcher = launcher
        self.profile_time = profile_time
        self.client = open_client()
        self.commit = git_state()["git.commit"]
        self.events: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self.state: dict[tuple[str, str, int], str] = {}  # (study, experiment, seed): done | failed
        self.effective: dict[str, tuple[Job, str | None]] = {}  # effective hash: first job, its run
        self.durations: list[float] = []
        self.offline = False  # the tracking server went away: no job starts, the rest wait for it
        self.failures: list[str] = []
        self.not_started: list[str] = []
        self.skipped = self.copied = 0
        self.timings: dict[str, dict[str, float]] = {}
        self.fps: dict[int, dict[str, str]] = {}
        self.locks: dict[int, Any] = {}  # job index: this grid's lock on its folder (take_job_lock)
        self.held_elsewhere: set[int] = set()  # jobs whose folder another grid holds: waiting for it
        self.planning = Stopwatch()
        self.started = time.perf_counter()

    def key(self, job: Job, experiment: str | None = None) -> tuple[str, str, int]:
        return (job.study, experiment or job.experiment, job.seed)

    def say(self, index: int, job: Job, text: str) -> None:
        print(f"[{index}/{len(self.jobs)}] {job.label}: {text}", flush=True)

    def fail(
        self, index: int, job: Job, fp: dict[str, str] | None, message: str, logs: list[str] | None = None
    ) -> None:
        try:
            run_id = _record_failure(self.client, job, fp, message)
        except Exception:
            if not self.server_gone():
                raise
            run_id = "unrecorded"
        last = message.splitlines()[-1][:300] if message else "failed"
        if logs:
            last += f" (log: {', '.join(logs)})"
        self.failures.append(f"{job.label} (run {run_id[:8]}): {last}")
        self.state[self.key(job)] = "failed"
        self.say(index, job, f"FAILED: {last}")

    def prepare_data(self) -> None:
        """Resolve every study's dataset before the first job, generating the synthetic ones not yet
        made side by side (``workers`` processes) rather than one by one as each study's first job
        comes up with a core idle. A dataset that fails here fails its jobs later, with their names."""
        requests: list[tuple[str, str | None]] = []
        with self.planning("plan"):
            for job in {j.study: j for j in reversed(self.jobs)}.values():  # each study's first job
                try:
                    parser = config_parser(job.configs, job.bundle_args())
                    dataset, root = (parser.get_parsed_content(k) for k in ("dataset", "data_root"))
                    requests.append((dataset, None if root is None else str(root)))
                except Exception:  # noqa: BLE001 - the job's own planning reports it
                    continue
            with self.planning("data"):  # nested: the time table gives data generation as part of planning
                resolve_data_roots(list(dict.fromkeys(requests)), self.workers)

    def run(self) -> None:
        try:
            self._run()
        finally:
            for index in list(self.locks):
                self.release(index)

    def _run(self) -> None:
        self.prepare_data()
        pending = list(enumerate(self.jobs, 1))
        running: dict[int, _Slot] = {}
        changed = True  # a job ended (or none started yet): what can start now may have changed
        while pending or running:
            while changed and len(running) < self.workers and not self.offline:
                changed = False
                for item in list(pending):
                    outcome = self.start(*item)
                    if outcome == "wait":
                        continue
                    pending.remove(item)
                    changed = True  # a skip, copy or failure may free a job waiting on it
                    if isinstance(outcome, _Slot):
                        running[outcome.index] = outcome
                        break
            if not running and self.offline:
                self.not_started = [job.label for _, job in pending]
                return
            if not running and not self.held_elsewhere:
                for index, job in pending:  # nothing runs, so what they wait on can never end
                    self.fail(index, job, self.fps.get(index), "waits on a job that never ran")
                return
            try:  # while another grid holds a job, look again every few seconds
                kind, index, value = self.events.get(timeout=2.0 if self.held_elsewhere else None)
            except queue.Empty:
                changed = True
                continue
            if kind == "line":
                self.progress(running[index], value)
            else:
                self.finish(running.pop(index), value)
                changed = True

    def start(self, index: int, job: Job) -> str | _Slot:
        """Skip, copy, fail or launch ``job``; ``"wait"`` while a job it needs is not done or another
        grid holds its folder. A launched job keeps its folder's lock until :meth:`finish`."""
        outcome = self._start(index, job)
        if not isinstance(outcome, _Slot):
            self.release(index)
        return outcome

    def release(self, index: int) -> None:
        handle = self.locks.pop(index, None)
        if handle is not None:
            handle.close()

    def _lock(self, index: int, job: Job) -> bool:
        """Whether this grid holds ``job``'s folder now (taking the lock if free); says once, in one
        line, that it waits when another grid holds it."""
        if index in self.locks:
            return True
        handle, holder = take_job_lock(job)
        if handle is None:
            if index not in self.held_elsewhere:
                self.say(index, job, f"{job.output_dir} is held by another grid ({holder}): waiting for it")
            self.held_elsewhere.add(index)
            return False
        self.held_elsewhere.discard(index)
        self.locks[index] = handle
        return True

    def _start(self, index: int, job: Job) -> str | _Slot:
        if job.init_from:
            parent = self.state.get(self.key(job, job.init_from))
            if parent is None:
                return "wait"
            if parent == "failed":
                self.fail(index, job, None, f"its parent '{job.init_from}' failed")
                return "failed"
        fp = self.fps.get(index)
        try:
            if fp is None:
                with self.planning("plan"):
                    fp = self.fps[index] = fingerprint(job, self.planning)
            twin = self.effective.get(fp["effective_hash"])
            if twin is not None and twin[1] is None and self.state.get(self.key(twin[0])) != "failed":
                return "wait"  # its twin is running: copy it when done
            if not self._lock(index, job):  # before reading or deleting anything of its folder
                return "wait"
            done = None if self.force else _finished_run(self.client, job, fp, self.commit)
            if done:
                self.skipped += 1
                self.tag(done, job, fp)  # the grid's own tags (paper figures, notes, references) as now
                self.state[self.key(job)] = "done"
                self.effective.setdefault(fp["effective_hash"], (job, done))
                self.say(index, job, f"done already (run {done[:8]}), skipped")
                return "skipped"
            if twin is not None and twin[1] is not None:
                run_id = _copy_run(self.client, twin[1], twin[0], job)
                self.copied += 1
                if twin[0].split != job.split:  # the same training scored on another split
                    self.say(
                        index, job, f"same training as {twin[0].experiment}: copied, evaluating {job.split}"
                    )
                    return self.launch(index, job, fp, evaluate_only=True)
                self.tag(run_id, job, fp)
                self.state[self.key(job)] = "done"
                self.say(
                    index,
                    job,
                    f"same effective config as {twin[0].experiment}: copied its run ({run_id[:8]})",
                )
                return "copied"
            self.effective[fp["effective_hash"]] = (job, None)
            self.say(index, job, f"training on {fp['dataset']} -> {job.output_dir}")
            return self.launch(index, job, fp)
        except Exception as e:  # one failed run must not stop the grid
            self.fail(index, job, fp, str(e).strip() or type(e).__name__)
            return "failed"

    def launch(self, index: int, job: Job, fp: dict[str, str], evaluate_only: bool = False) -> _Slot:
        """Start ``job``'s process (``evaluate_only``: its folder holds a copied training already)."""
        out = Path(job.output_dir)
        if out.exists() and not evaluate_only:
            shutil.rmtree(out)  # a rerun starts clean: no stale model or run record
        out.mkdir(parents=True, exist_ok=True)
        log = out / "reproduce.log"
        log.write_text("")
        spec = json.dumps(job.__dict__)
        handle = self.launcher.start(str(log), spec, self.threads, time.time(), evaluate_only)
        slot = _Slot(job, index, fp, handle, time.perf_counter(), int(fp["max_epochs"]))
        threading.Thread(target=self.read, args=(slot, log), daemon=True).start()
        return slot

    def read(self, slot: _Slot, log: Path) -> None:
        """Reader thread: the job's log, line by line as it grows, to the main thread, then its exit."""
        partial = ""
        with log.open() as f:
            while True:
                partial += f.readline()
                if partial.endswith("\n"):
                    self.events.put(("line", slot.index, partial.rstrip()))
                    partial = ""
                    continue
                if not slot.handle.alive():
                    for rest in (partial + f.read()).splitlines():
                        self.events.put(("line", slot.index, rest))
                    break
                time.sleep(self.launcher.poll_s)
        self.events.put(("exit", slot.index, slot.handle.wait()))

    def progress(self, slot: _Slot, line: str) -> None:
        slot.tail.append(line)
        del slot.tail[:-40]
        m = _EPOCH.search(line)
        if not m:
            return
        epoch, now = int(m.group(1)), time.perf_counter()
        elapsed = now - slot.started
        this_left = elapsed / epoch * max(slot.max_epochs - epoch, 0)
        per_job = statistics.mean(self.durations) if self.durations else elapsed / epoch * slot.max_epochs
        left = sum(1 for j in self.jobs[slot.index :] if self.state.get(self.key(j)) is None)
        eta = this_left + per_job * left / self.workers
        self.say(
            slot.index,
            slot.job,
            f"epoch {epoch}/{slot.max_epochs}, elapsed {format_duration(now - self.started)}, "
            f"ETA {format_duration(eta)}",
        )

    def finish(self, slot: _Slot, status: int) -> None:
        try:
            self._finish(slot, status)
        finally:
            self.release(slot.index)  # tagged or recorded FAILED: another grid may take the folder

    def _finish(self, slot: _Slot, status: int) -> None:
        job, index = slot.job, slot.index
        self.durations.append(time.perf_counter() - slot.started)
        try:
            if status != 0:
                tail = "\n".join(slot.tail)
                raise RuntimeError(next((ln for ln in reversed(slot.tail) if ln.startswith("error:")), tail))
            run_id = recorded_run(job.output_dir)
            if run_id is None:
                raise RuntimeError(f"the job ended without an MLflow run recorded in {job.output_dir}")
            try:
                self.tag(run_id, job, slot.fp)
            except Exception:
                if not self.server_gone():
                    raise
                journal(  # the tags wait in the job's journal with its other results
                    job.output_dir, run_id, tags={**_job_tags(job, slot.fp), "reproduce.status": "complete"}
                )
            self.state[self.key(job)] = "done"
            first = self.effective.get(slot.fp["effective_hash"])
            if first is None or first[1] is None:  # twins waiting on this job copy its run
                self.effective[slot.fp["effective_hash"]] = (job, run_id)
            timing = self.read_timings(job)
            self.say(
                index, job, f"finished (run {run_id[:8]}) in {format_duration(self.durations[-1])}{timing}"
            )
        except Exception as e:
            self.effective.pop(slot.fp["effective_hash"], None)  # a twin waiting on it runs itself
            self.fail(index, job, slot.fp, str(e).strip() or type(e).__name__, slot.handle.logs)

    def server_gone(self) -> bool:
        """Whether the tracking server stopped answering (after a failed call): the grid then starts
        no more jobs, and says so once."""
        if server_answers():
            return False
        if not self.offline:
            print(
                f"the MLflow server {redact(tracking_uri())} went away: no more jobs start; the running ones "
                "finish and keep what the server did not get in their folders",
                flush=True,
            )
        self.offline = True
        return True

    def tag(self, run_id: str, job: Job, fp: dict[str, str]) -> None:
        for key, value in _job_tags(job, fp).items():
            self.client.set_tag(run_id, key, value)
        self.client.set_tag(run_id, "reproduce.status", "complete")

    def read_timings(self, job: Job) -> str:
        path = Path(job.output_dir) / "timings.json"
        if not path.is_file():
            return ""
        seconds = json.loads(path.read_text())["seconds"]
        self.timings[job.label] = seconds
        if not self.profile_time:
            return ""
        return ": " + ", ".join(f"{k} {seconds[k]:.1f}" for k in PHASES if k in seconds)

    def summary(self) -> str:
        ran = len(self.jobs) - self.skipped - self.copied - len(self.failures) - len(self.not_started)
        waiting = f", {len(self.not_started)} not started" if self.not_started else ""
        return (
            f"reproduce: {ran} ran, {self.skipped} skipped, {self.copied} copied, {len(self.failures)} failed"
            f"{waiting} "
            f"in {format_duration(time.perf_counter() - self.started)} ({self.workers} at once, "
            f"{self.threads} thread{'s' if self.threads > 1 else ''} each; launcher {self.launcher.name})"
        )

    def time_table(self, report_s: float | None) -> str:
        """Seconds per phase per job that ran, their totals, and the grid's own (planning, data, report)."""
        rows = [["job", *PHASES, "total"]]
        totals = dict.fromkeys(PHASES, 0.0)
        for label, seconds in self.timings.items():
            rows.append(
                [label, *(f"{seconds.get(k, 0.0):.1f}" for k in PHASES), f"{sum(seconds.values()):.1f}"]
            )
            for k in PHASES:
                totals[k] += seconds.get(k, 0.0)
        rows.append(
            [
                "all jobs (process seconds)",
                *(f"{totals[k]:.1f}" for k in PHASES),
                f"{sum(totals.values()):.1f}",
            ]
        )
        width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width, strict=True)))
            for r in rows
        ]
        plan_s = self.planning.seconds
        grid = (
            f"launcher: planning {plan_s.get('plan', 0.0):.1f} s (configs, hashes; data generation "
            f"{plan_s.get('data', 0.0):.1f} s of it), report {report_s or 0.0:.1f} s; "
            f"wall {format_duration(time.perf_counter() - self.started)} on {cpu_description()}"
        )
        return "\n".join([*lines, grid])


def reproduce(
    profile: str = "quick",
    studies: list[str] | None = None,
    seeds: list[int] | None = None,
    force: bool = False,
    bundles_dir: Path | None = None,
    runs_dir: Path | None = None,
    report: bool = True,
    jobs: int | None = None,
    profile_time: bool = False,
    launcher: str = "local",
    slurm: SlurmSettings | None = None,
    fast: bool = False,
) -> int:
    """Run the grid through ``launcher`` (``medseg_monai.launch``); returns the exit status (1 when
    any job failed)."""
    runs = runs_dir or project_root() / "runs" / "reproduce"
    backend = make_launcher(
        launcher,
        process_target=_job_process,
        submitted_target=_submitted_job,
        preload=_PRELOAD,
        folder=runs / profile / "submitit",
        slurm=slurm,
    )
    uri = check_tracking_uri()
    if launcher == "slurm" and not uri.startswith(("http://", "https://")):
        print(
            f"warning: jobs on several nodes will write to {uri}; SQLite on a network file system is "
            "unsafe with many writers: track to an MLflow server (MLFLOW_TRACKING_URI=http://host:port)",
            file=sys.stderr,
        )
    planned = plan(profile, studies, seeds, bundles_dir, runs_dir)
    for job in planned if fast else []:  # the GPU fast path: a setting of the run, so hashed with it
        job.overrides["fast"] = True
    workers = max(1, jobs or (len(planned) if launcher == "slurm" else default_workers(profile)))
    threads = backend.threads(workers, os.cpu_count() or 1)
    print(
        f"reproduce ({profile}): {len(planned)} runs of {', '.join(dict.fromkeys(j.study for j in planned))}, "
        f"{workers} at once through the {launcher} launcher; tracking {redact(uri)}",
        flush=True,
    )
    grid = _Grid(planned, force, workers, threads, profile_time, backend)
    grid.run()
    print(grid.summary(), flush=True)
    report_s = None
    if grid.offline:
        print(
            f"error: the MLflow server {redact(uri)} went away during the grid ({len(grid.not_started)} jobs not "
            f"started). When it answers again: python -m medseg_monai.tracking upload {runs / profile}, "
            "then run the same reproduce command: the uploaded runs are skipped, the others run, and "
            "the report is built.",
            file=sys.stderr,
        )
        return 1
    if report:
        start = time.perf_counter()
        print(f"report: {build_report()}", flush=True)
        report_s = time.perf_counter() - start
    table = grid.time_table(report_s)
    if grid.timings:
        where = runs / profile / "timings.txt"
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(table + "\n")
        if profile_time:
            print(f"where the time went (seconds; also in {where}):\n{table}", flush=True)
    if grid.failures:
        print("failed runs:\n  " + "\n  ".join(grid.failures), file=sys.stderr)
        return 1
    return 0


_PRELOAD = ["torch", "monai.bundle", "monai.engines", "monai.handlers", "monai.networks.nets", "mlflow"]
_PRELOAD += [
    "medseg_monai.bundle",
    "medseg_monai.handlers",
    "medseg_monai.transforms",
    "medseg_monai.networks",
    "medseg_monai.visualize",
]
# what every job imported lazily after the fork, 3 s of it a job: MLflow's SQL store (its first
# client), torch._dynamo (the optimiser's first step), GitPython (the run record's commit)
_PRELOAD += ["mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.dialects.sqlite", "torch._dynamo", "git"]


def _job_process(log: str, spec: str, threads: int, spawned: float, evaluate_only: bool = False) -> None:
    """Body of a ``local`` job's process (forked from the preloaded server): :func:`_job_body`, whose
    status ends the process."""
    sys.exit(_job_body(log, spec, threads, spawned, evaluate_only))


def _submitted_job(log: str, spec: str, threads: int, spawned: float, evaluate_only: bool = False) -> int:
    """Body of a job submitted through submitit (its own interpreter, on a node of the cluster or
    here): :func:`_job_body`, whose status is the job's result; the interpreter's own output is
    given back to submitit's log when the job is over."""
    saved = [os.dup(1), os.dup(2)]
    try:
        return _job_body(log, spec, threads, spawned, evaluate_only)
    finally:
        for target, fd in zip((1, 2), saved, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def _job_body(log: str, spec: str, threads: int, spawned: float, evaluate_only: bool) -> int:
    """A job's output into ``log`` (which the launcher follows), ``threads`` CPU threads, then
    :func:`_run_job`; an error ends it as a command would (the error hook's line or traceback,
    status 1)."""
    import warnings

    import torch

    redirect_output(log)
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    os.environ["PYTHONWARNINGS"] = "ignore"
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    os.chdir(project_root())
    try:
        code = _run_job(spec, spawned, evaluate_only)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _run_job(spec: str, spawned: float | None = None, evaluate_only: bool = False) -> int:
    """Train, then evaluate, the job given as JSON (one interpreter, two bundle runs; only the second
    when ``evaluate_only``), timing the phases into ``<output_dir>/timings.json`` (``start``: since
    ``spawned``, the launcher's wall-clock time)."""
    watch = Stopwatch()
    if spawned is not None:
        watch.add("start", time.time() - spawned)
    install_error_hook()
    job = Job(**json.loads(spec))
    if not evaluate_only:
        run(job.configs, stopwatch=watch, mode="train", **job.bundle_args())
    evaluate = str(Path(job.configs[0]).with_name("evaluate.yaml"))
    run([*job.configs, evaluate], stopwatch=watch, mode="evaluate", split=job.split, **job.bundle_args())
    watch.write(Path(job.output_dir) / "timings.json", threads=torch_threads())
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
    parser.add_argument(
        "--jobs",
        type=int,
        help="jobs at once, each on cores/jobs threads (default: quick one per core up to 4, paper 1)",
    )
    parser.add_argument(
        "--profile-time",
        "--profile_time",
        dest="profile_time",
        action="store_true",
        help="print where each job's seconds went (process start, data, caching, training, ...)",
    )
    parser.add_argument(
        "--launcher",
        default="local",
        choices=LAUNCHERS,
        help="where jobs run: this machine (local), SLURM through submitit (slurm), or submitit's local "
        "executor (submitit-local)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="every job on the GPU fast path (the bundles' fast: true)"
    )
    slurm = parser.add_argument_group("slurm", "resources of each job (--launcher slurm)")
    defaults = SlurmSettings()
    slurm.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    slurm.add_argument(
        "--gpus-per-job", "--gpus_per_job", dest="gpus_per_job", type=int, default=defaults.gpus_per_job
    )
    slurm.add_argument(
        "--cpus-per-job", "--cpus_per_job", dest="cpus_per_job", type=int, default=defaults.cpus_per_job
    )
    slurm.add_argument("--time", type=int, default=defaults.time_min, help="time limit of each job, minutes")
    slurm.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=int, help="memory of each job, GB")
    args = parser.parse_args(argv)
    try:
        return reproduce(
            args.profile,
            args.studies,
            args.seeds,
            args.force,
            args.bundles_dir,
            args.runs_dir,
            not args.no_report,
            args.jobs,
            args.profile_time,
            args.launcher,
            SlurmSettings(args.partition, args.gpus_per_job, args.cpus_per_job, args.time, args.mem_gb),
            args.fast,
        )
    except (DatasetError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
