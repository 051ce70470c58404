"""Where the grid's jobs run (``make reproduce-all LAUNCHER=...``):

* ``local`` (the default): processes forked on this machine from a server that imported torch, MONAI
  and MLflow once.
* ``slurm``: one SLURM job per grid job, submitted with `submitit <https://github.com/facebookincubator/submitit>`_
  from the cluster's login node (``sbatch`` on the PATH). The project folder, ``$MEDSEG_CACHE`` and
  the runs folder must be on a file system the compute nodes share, and the jobs should track to an
  MLflow server (``MLFLOW_TRACKING_URI``): SQLite on a network file system is unsafe with many writers.
* ``submitit-local``: submitit's local executor, the ``slurm`` path (pickled job, its own interpreter,
  submitit's logs and result files) run on this machine: for tests and machines without SLURM.

A launcher starts a job and returns a handle the grid polls (``alive``), then waits on (``wait``: the
job's exit status); ``logs`` names the files to read when it failed. Dependencies (a fine-tuning
entry after its parent) and the skip rule stay in the grid (``medseg_monai.reproduce``), the same for
every launcher.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg_monai.errors import InputError

__all__ = ["LAUNCHERS", "SlurmSettings", "make_launcher", "redirect_output"]

LAUNCHERS = ("local", "slurm", "submitit-local")


def redirect_output(stdout: str | Path, stderr: str | Path | None = None, append: bool = True) -> None:
    """This process's file descriptors 1 and 2 (what C extensions and child processes write too)
    onto ``stdout`` and ``stderr`` (``stdout`` when None), created if missing, appended to or
    truncated, and ``sys.stdout`` / ``sys.stderr`` reopened on them line-buffered: the body of a
    forked job, whose log is read while it runs."""
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    for target, path in ((1, stdout), (2, stderr)):
        if path is None:
            os.dup2(1, target)
            continue
        fd = os.open(path, mode)
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


@dataclass
class SlurmSettings:
    """The resources of one grid job on the cluster (``make reproduce-all LAUNCHER=slurm PARTITION=...
    GPUS_PER_JOB=... CPUS_PER_JOB=... TIME=...``); ``time_min`` is SLURM's ``--time`` in minutes."""

    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    time_min: int = 720
    mem_gb: int | None = None


class _ProcessHandle:
    def __init__(self, proc: Any, log: str) -> None:
        self.proc, self.logs = proc, [log]

    def alive(self) -> bool:
        return self.proc.is_alive()

    def wait(self) -> int:
        self.proc.join()
        return int(self.proc.exitcode)


class LocalLauncher:
    """Job processes forked from a preloaded server on this machine."""

    name = "local"
    poll_s = 0.2

    def __init__(self, target: Callable[..., None], preload: list[str]) -> None:
        self.target = target
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(preload)

    def threads(self, workers: int, cores: int) -> int:
        return max(1, cores // workers)

    def start(self, log: str, *args: Any) -> _ProcessHandle:
        proc = self.context.Process(target=self.target, args=(log, *args))
        proc.start()
        return _ProcessHandle(proc, log)


class _SubmititHandle:
    def __init__(self, job: Any, log: str) -> None:
        self.job = job
        self.logs = [log, str(job.paths.stderr)]

    def alive(self) -> bool:
        return not self.job.done()

    def wait(self) -> int:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return int(self.job.result())
        except (FailedJobError, UncompletedJobError) as e:  # killed, timed out, preempted
            print(f"submitit: job {self.job.job_id} failed: {str(e).splitlines()[0]}", flush=True)
            return 1


class SubmititLauncher:
    """Each job submitted through submitit: to SLURM (``cluster="slurm"``) or to its local executor
    (``cluster="local"``). submitit's own logs go to ``<folder>/<job id>_0_log.{out,err}``."""

    poll_s = 1.0

    def __init__(self, target: Callable[..., int], cluster: str, folder: Path, slurm: SlurmSettings) -> None:
        import submitit

        self.name = "slurm" if cluster == "slurm" else "submitit-local"
        self.target, self.slurm = target, slurm
        folder.mkdir(parents=True, exist_ok=True)
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params: dict[str, Any] = {"timeout_min": slurm.time_min, "name": "medseg-reproduce"}
        if cluster == "slurm":
            params.update(
                slurm_partition=slurm.partition,
                gpus_per_node=slurm.gpus_per_job,
                cpus_per_task=slurm.cpus_per_job,
                tasks_per_node=1,
                nodes=1,
            )
            if slurm.mem_gb:
                params["mem_gb"] = slurm.mem_gb
            params = {k: v for k, v in params.items() if v is not None}
        self.executor.update_parameters(**params)

    def threads(self, workers: int, cores: int) -> int:
        # a SLURM job owns its allocation; local jobs share this machine's cores
        return self.slurm.cpus_per_job if self.name == "slurm" else max(1, cores // workers)

    def start(self, log: str, *args: Any) -> _SubmititHandle:
        return _SubmititHandle(self.executor.submit(self.target, log, *args), log)


def make_launcher(
    name: str,
    *,
    process_target: Callable[..., None],
    submitted_target: Callable[..., int],
    preload: list[str],
    folder: Path,
    slurm: SlurmSettings | None = None,
) -> LocalLauncher | SubmititLauncher:
    """The launcher ``name`` (one of :data:`LAUNCHERS`); a setting it cannot honour is refused in one
    line before anything runs."""
    if name not in LAUNCHERS:
        raise InputError(f"unknown launcher '{name}' (choose from {', '.join(LAUNCHERS)})")
    if name == "local":
        return LocalLauncher(process_target, preload)
    missing = [c for c in ("sbatch", "srun") if name == "slurm" and shutil.which(c) is None]
    if missing:
        raise InputError(
            f"LAUNCHER=slurm submits with sbatch and srun; {missing[0]} is not on the PATH: run it on the "
            "cluster's login node (LAUNCHER=submitit-local runs the same path on this machine)"
        )
    settings = slurm or SlurmSettings()
    for key in ("gpus_per_job", "cpus_per_job", "time_min"):
        if getattr(settings, key) < (0 if key == "gpus_per_job" else 1):
            raise InputError(f"{key} must be a positive number, got {getattr(settings, key)}")
    cluster = "slurm" if name == "slurm" else "local"
    return SubmititLauncher(submitted_target, cluster, folder, settings)
