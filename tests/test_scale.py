"""Beyond one machine: the grid through submitit, a shared MLflow server (and its loss mid-run), and
DDP training under torchrun with metrics gathered from every rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from bundle_utils import ROOT, local_store_env, parse_study
from medseg_monai.config import command_line, config_files
from medseg_monai.handlers.progress import evaluation_values
from medseg_monai.launch import SlurmSettings, make_launcher
from medseg_monai.reproduce import main as reproduce_main
from medseg_monai.tracking import OFFLINE_RECORD

STUDIES = ["brats", "knee", "lv", "wmh", "xray"]


# ----------------------------------------------------------------------------- launchers


def test_slurm_launcher_is_refused_in_one_line_without_slurm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    assert reproduce_main(["--launcher", "slurm", "--runs_dir", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and err[0].startswith("error: LAUNCHER=slurm submits with sbatch and srun")


def test_slurm_launcher_asks_for_the_resources_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """PARTITION, GPUS_PER_JOB, CPUS_PER_JOB and TIME reach the job's sbatch script (submitit writes it;
    nothing is submitted here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = make_launcher(
        "slurm",
        process_target=print,
        submitted_target=print,
        preload=[],
        folder=tmp_path / "submitit",
        slurm=SlurmSettings(partition="gpu", gpus_per_job=2, cpus_per_job=6, time_min=90),
    )
    script = launcher.executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=6", "--time=90"):
        assert f"#SBATCH {line}" in script
    assert launcher.threads(workers=40, cores=2) == 6  # a job gets its allocation's cores
    with pytest.raises(Exception, match="time_min must be a positive number"):
        make_launcher("slurm", process_target=print, submitted_target=print, preload=[],
                      folder=tmp_path, slurm=SlurmSettings(time_min=0))  # fmt: skip


# ----------------------------------------------------------------------------- a real MLflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"]
        log = (self.folder / "server.log").open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn workers, at once
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "server"
    folder.mkdir()
    srv = Server(folder)
    srv.start()
    yield srv
    srv.stop()


def _env(tmp_path: Path, uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONWARNINGS": "ignore"}
    env["MEDSEG_MLFLOW_DIR"] = str(tmp_path / "local-mlflow")  # where the report is written
    return env


GRID = {
    "study": "xray",
    "split": "val",
    "metrics": ["dice"],
    "seeds": {"quick": [0, 1]},
    "experiments": [
        {"name": "baseline", "config": "experiments/baseline.yaml"},
        {"name": "noise_val_only", "config": "experiments/noise_val_only.yaml"},
        # a child waits for its parent (only the order is tested: X-ray loads no weights)
        {"name": "finetuned", "config": "experiments/finetuned.yaml", "init_from": "baseline"},
    ],
}  # fmt: skip


def _submitit_span(log: Path) -> tuple[datetime, datetime]:
    """When a submitit job started and completed, from the timestamps of its log's own lines."""
    times = {}
    for line in log.read_text().splitlines():
        for event, marker in (
            ("start", "Starting with JobEnvironment"),
            ("end", "Job completed successfully"),
        ):
            if line.startswith("submitit INFO (") and marker in line:
                times[event] = datetime.strptime(line[15:38], "%Y-%m-%d %H:%M:%S,%f")
    return times["start"], times["end"]


@pytest.mark.slow
def test_grid_through_submitit_against_an_mlflow_server(server: Server, tmp_path: Path) -> None:
    """Six quick jobs through submitit's local executor, three at once, all tracking to one server."""
    configs = tmp_path / "bundles" / "xray" / "configs"
    shutil.copytree(ROOT / "bundles" / "xray" / "configs", configs)
    with (configs / "quick.yaml").open("a") as quick:  # tinier: 2 epochs at 32 px
        quick.write("max_epochs: 2\nimage_size: 32\n")
    (configs / "reproduce.yaml").write_text(yaml.safe_dump(GRID))
    # the key a fine-tuning entry sets (WMH's): here declared, unused
    (configs / "experiments" / "finetuned.yaml").write_text("pretrained_ckpt: null\nlearning_rate: 5.0e-4\n")
    cmd = [sys.executable, "-m", "medseg_monai.reproduce", "--bundles_dir", str(tmp_path / "bundles")]
    cmd += ["--runs_dir", str(tmp_path / "runs"), "--launcher", "submitit-local", "--jobs", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path, server.uri), cwd=ROOT,
                            timeout=900)  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "3 at once through the submitit-local launcher" in out
    assert "reproduce: 6 ran, 0 skipped, 0 copied, 0 failed" in out
    assert out.count("finished (run") == 6  # progress as each job ends
    for seed in (0, 1):  # the fine-tuning entry started only once its parent had finished
        parent_done = out.index(f"xray/baseline seed {seed}: finished")
        assert out.index(f"xray/finetuned seed {seed}: training") > parent_done
    assert list((tmp_path / "runs" / "quick" / "submitit").glob("*_0_log.err"))  # submitit ran them

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("xray")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`reproduce.status` != ''")
    assert len(runs) == 6, [r.data.tags.get("mlflow.runName") for r in runs]  # none lost or duplicated
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in runs) == sorted(
        (e["name"], str(s)) for e in GRID["experiments"] for s in (0, 1)
    )
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["reproduce.status"] == "complete"
        assert len(client.get_metric_history(run.info.run_id, "val_dice")) == 2
        assert "eval_val_dice" in run.data.metrics
        assert {"model.pt", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # at least three jobs ran at once: their processes' spans, from submitit's own log lines (a run's
    # MLflow span is a few seconds of a job, too short to overlap reliably on a loaded machine)
    spans = [_submitit_span(log) for log in (tmp_path / "runs" / "quick" / "submitit").glob("*_0_log.out")]
    assert len(spans) == 6
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) >= 3
    report = (tmp_path / "local-mlflow" / "reports" / "report.md").read_text()
    assert f"From MLflow store `{server.uri}`" in report and "| finetuned |" in report


@pytest.mark.slow
def test_training_outlives_its_server_and_uploads_later(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = _env(tmp_path, server.uri)
    # MLflow's client retries a lost server for minutes by default; one quick retry here
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
    args = command_line(config_files("xray", profile="quick"), output_dir=str(out), max_epochs=6)
    train = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=ROOT)  # fmt: skip
    deadline = time.time() + 300
    while not (out / "mlflow_run.json").is_file() and train.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    server.stop()  # the run is open; its server goes away
    log = train.communicate(timeout=600)[0]
    assert train.returncode == 0, log[-3000:]
    assert "went away" in log and "python -m medseg_monai.tracking upload" in log
    assert (out / "model.pt").is_file() and (out / OFFLINE_RECORD).is_file()
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]

    server.start()  # back, same store
    up = subprocess.run([sys.executable, "-m", "medseg_monai.tracking", "upload", str(tmp_path)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert up.returncode == 0 and "uploaded 1 run(s)" in up.stdout, up.stdout + up.stderr
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in sorted(client.get_metric_history(run_id, "val_dice"), key=lambda m: m.step)] == [
        1, 2, 3, 4, 5, 6
    ]  # fmt: skip
    assert {"model.pt", "config.json"} <= {a.path for a in client.list_artifacts(run_id)}
    assert not (out / OFFLINE_RECORD).exists()
    again = subprocess.run([sys.executable, "-m", "medseg_monai.tracking", "upload", str(tmp_path)],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert again.returncode == 0 and "uploaded 0 run(s)" in again.stdout  # nothing sent twice


# ----------------------------------------------------------------------------- DDP under torchrun


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_torchrun_two_processes_gather_what_one_process_scores(study: str, tmp_path: Path) -> None:
    """``multi_gpu_train.yaml`` under ``torchrun --nproc_per_node=2`` on gloo (CPU): both ranks train
    and validate their shards, rank 0 alone tracks and saves, and the validation metrics gathered
    from both ranks equal one process's evaluation of the saved model on every validation case."""
    out, store = tmp_path / "run", tmp_path / "mlflow"
    files = config_files(study, "multi_gpu_train", profile="quick")
    # one epoch, validated; nothing cached, so each rank prepares its own shard only
    overrides = {"output_dir": str(out), "max_epochs": 1, "val_interval": 1, "cache_rate": 0.0}
    bundle_args = command_line(files, **overrides)[1:]  # -m monai.bundle run ...
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *bundle_args]
    env = local_store_env(store, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for rank in (0, 1):  # each rank trained and validated its own shard
        assert f"rank {rank} of 2:" in log and "training cases" in log and "validation cases" in log
    assert log.count("saved final checkpoint") == 1  # rank 0 alone saves
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone tracks
    logged = runs[0].data.metrics

    # one process, the same config without the DDP layer, the saved model, every validation case
    parser = parse_study(study, profile="quick", output_dir=str(tmp_path / "single"))
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(out / "model_final.pt", map_location="cpu"))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    prefix = parser.get_parsed_content("validate#prefix")
    single = {prefix + k: v for k, v in evaluation_values(evaluator).items()}
    assert single and set(single) <= set(logged)
    for name, value in single.items():
        print(f"{study} {name}: gathered from 2 ranks {logged[name]:.6f}, one process {value:.6f}")
        assert logged[name] == pytest.approx(value, abs=1e-5), name
