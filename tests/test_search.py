"""Hyperparameter search (medseg_monai.search): the paper's sampling rule, resumption after a killed
worker, parallel workers, the command's one-line refusals, and one tiny search of the X-ray bundle
end to end (MLflow nesting, figure)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from scipy import stats

from bundle_utils import ROOT, local_store_env, metric_values, mlflow_client
from medseg_monai.errors import InputError
from medseg_monai.search import (
    BestNeighbourhoodSampler,
    Parameter,
    TrialFailed,
    TrialInterrupted,
    load_spec,
    main,
    open_study,
    run_worker,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

LR = Parameter("lr", 1e-3, 1e-9, 1.0)


def _study(parameters: list[Parameter], seed: int = 0, direction: str = "maximize") -> optuna.Study:
    start = {p.name: p.start for p in parameters}
    return optuna.create_study(direction=direction, sampler=BestNeighbourhoodSampler(start, seed=seed))


def _draw(study: optuna.Study, parameters: list[Parameter], score: float | None = None) -> dict:
    trial = study.ask()
    values = {p.name: p.suggest(trial) for p in parameters}
    if score is not None:
        study.tell(trial, score)
    return values


# ----------------------------------------------------------------------------- the sampler


def test_first_trial_takes_the_start_values_then_draws_log_uniform_around_the_best() -> None:
    study = _study([LR])
    assert _draw(study, [LR], 0.5) == {"lr": 1e-3}
    # worse candidates leave the best at trial 0: draws in [1e-4, 1e-2], uniform in log10
    logs = np.array([math.log10(_draw(study, [LR], 0.1)["lr"] / 1e-3) for _ in range(800)])
    assert logs.min() >= -1 and logs.max() <= 1
    assert stats.kstest(logs, stats.uniform(loc=-1, scale=2).cdf).pvalue > 0.001
    counts = np.histogram(logs, bins=4, range=(-1, 1))[0]
    assert all(150 <= c <= 250 for c in counts), counts  # 200 expected per quarter (log scale)
    # a better candidate is kept: the next draws centre on it
    kept = _draw(study, [LR], 0.9)["lr"]
    assert study.best_trial.params["lr"] == kept
    later = [_draw(study, [LR], 0.1)["lr"] for _ in range(100)]
    assert all(kept / 10 <= v <= kept * 10 for v in later)
    assert min(later) < kept / 3 and max(later) > kept * 3  # the whole decade either way is reached


def test_draws_respect_bounds_and_whole_numbers_and_minimise() -> None:
    momentum = Parameter("momentum", 0.5, 1e-6, 0.9)
    patience = Parameter("patience", 5, 1, 100, integer=True)
    study = _study([momentum, patience], direction="minimize")
    assert _draw(study, [momentum, patience], 1.0) == {"momentum": 0.5, "patience": 5}
    draws = [_draw(study, [momentum, patience], 2.0) for _ in range(300)]  # worse: higher
    assert all(0.05 <= d["momentum"] <= 0.9 for d in draws)  # [0.05, 5] clipped to the max 0.9
    assert max(d["momentum"] for d in draws) > 0.8
    logs = [math.log(d["momentum"]) for d in draws]  # log-uniform on the clipped interval
    assert (
        stats.kstest(logs, stats.uniform(loc=math.log(0.05), scale=math.log(0.9 / 0.05)).cdf).pvalue > 0.001
    )
    patiences = [d["patience"] for d in draws]  # [0.5, 50] clipped to the min 1, rounded
    assert all(isinstance(p, int) and 1 <= p <= 50 for p in patiences)
    assert len(set(patiences)) > 15 and max(patiences) > 30 and patiences.count(1) > 10


def test_draws_are_seeded_and_parallel_first_trials_do_not_repeat_the_start() -> None:
    def history(seed: int) -> list[dict]:
        study = _study([LR], seed=seed)
        return [_draw(study, [LR], s) for s in (0.5, 0.7, 0.2, 0.9, 0.1)]

    assert history(3) == history(3)
    assert history(3) != history(4)
    study = _study([LR])
    first = study.ask()
    assert LR.suggest(first) == 1e-3  # the start values
    second = study.ask()  # asked while the first still runs (another worker): a draw around the start
    value = LR.suggest(second)
    assert value != 1e-3 and 1e-4 <= value <= 1e-2


def test_search_spec_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text(
        "metric: val_iou\nsteps: {paper: 5000, quick: 40}\n"
        "parameters: {learning_rate: 7.6e-5, dropout: {start: 0.15, max: 0.9}, lr_patience: null}\n"
    )
    spec = load_spec(path)
    assert spec.metric == "val_iou" and spec.per_profile("steps", "quick") == 40 and spec.factor == 10
    params = spec.resolve(lambda key: {"lr_patience": 5}[key])  # null: the bundle's configured value
    assert [(p.name, p.start, p.high, p.integer) for p in params] == [
        ("learning_rate", 7.6e-5, 7.6e-5 * 1e6, False),
        ("dropout", 0.15, 0.9, False),
        ("lr_patience", 5, 5e6, True),
    ]
    for text, message in [
        ("parameters: {lr: 0.1}\nstep: 5\n", "unknown key 'step'"),
        ("parameters: {lr: {start: 0.1, maximum: 1}}\n", "parameter 'lr': unknown key 'maximum'"),
        ("parameters: {lr: -0.1}\n", "parameter 'lr': start must be a positive number"),
        ("parameters: {}\n", "'parameters' must map"),
        ("direction: up\nparameters: {lr: 0.1}\n", "direction must be maximize or minimize"),
        ("steps: {quick: 0}\nparameters: {lr: 0.1}\n", "steps must be a positive whole number"),
    ]:
        path.write_text(text)
        with pytest.raises(InputError, match=message) as info:
            load_spec(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    path.write_text("parameters: {lr: {start: 0.5, max: 0.1}}\n")
    with pytest.raises(InputError, match=r"needs 0 < min <= start <= max"):
        load_spec(path).resolve(lambda key: None)


# ----------------------------------------------------------------------------- workers on a journal

WORKER = r"""
import json, math, os, sys, time
from pathlib import Path
from medseg_monai.search import Parameter, open_study, run_worker

folder, n, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
params = [Parameter("lr", 1e-3, 1e-9, 1.0), Parameter("width", 16, 1, 1024, integer=True)]
study = open_study("t", folder, params, "maximize", settings={"what": "test"})
(folder / f"started-{os.getpid()}").touch()

def objective(trial, values, out):
    with open(folder / "evals.jsonl", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "number": trial.number, "params": values}) + "\n")
    if mode == "hang" and trial.number == 2:
        (folder / "hanging").touch()
        time.sleep(600)
    if mode == "pair":
        while len(list(folder.glob("started-*"))) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
    return -abs(math.log10(values["lr"]) + 2.5)

sys.exit(run_worker(study, params, n, folder, objective))
"""
PARAMS = [Parameter("lr", 1e-3, 1e-9, 1.0), Parameter("width", 16, 1, 1024, integer=True)]


def _worker(folder: Path, n: int, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(folder), str(n), mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _evals(folder: Path) -> list[dict]:
    path = folder / "evals.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_trial_left_running_by_a_killed_worker_is_rerun_once_and_completed_ones_are_kept(
    tmp_path: Path,
) -> None:
    worker = _worker(tmp_path, 4, "hang")
    deadline = time.time() + 120
    while not (tmp_path / "hanging").exists():
        assert worker.poll() is None and time.time() < deadline, worker.communicate()[0][-2000:]
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)  # no clean-up at all: trial 2 stays RUNNING in the journal
    worker.wait()
    study = open_study("t", tmp_path, PARAMS, "maximize", settings={"what": "test"})
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.COMPLETE, 2: TrialState.RUNNING}
    killed = study.get_trials()[2].params

    said, calls = [], []

    def objective(trial: optuna.Trial, values: dict, out: Path) -> float:
        calls.append((trial.number, values))
        assert out == tmp_path / f"trial{trial.number}" and out.is_dir()
        return -abs(math.log10(values["lr"]) + 2.5)

    assert run_worker(study, PARAMS, 4, tmp_path, objective, say=said.append) == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [
        TrialState.COMPLETE
    ] * 2
    assert trials[3].user_attrs["retry_of"] == 2 and trials[3].params == killed  # rerun with its params
    assert [n for n, _ in calls] == [3, 4] and calls[0][1] == killed  # trials 0 and 1 were not repeated
    assert said[0].startswith("trial 2: left running by a worker that is gone")
    assert said[1].startswith("[3/4] trial 3 (retry of 2): lr=") and "best" in said[1]
    # the same command again: nothing left to do, nothing repeated
    assert run_worker(study, PARAMS, 4, tmp_path, objective, say=said.append) == 0
    assert len(calls) == 2 and len(study.get_trials()) == 5


def test_two_workers_never_take_the_same_trial_and_stop_at_n(tmp_path: Path) -> None:
    workers = [_worker(tmp_path, 8, "pair") for _ in range(2)]
    outputs = [w.communicate(timeout=180)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    evals = _evals(tmp_path)
    numbers = [e["number"] for e in evals]
    assert sorted(numbers) == list(range(8))  # each trial evaluated once, none beyond N
    assert len({e["pid"] for e in evals}) == 2  # both workers took trials
    study = open_study("t", tmp_path, PARAMS, "maximize", settings={"what": "test"})
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 8
    assert {t.number: t.params for t in study.get_trials()} == {e["number"]: e["params"] for e in evals}
    assert sum(line.startswith("[") for out in outputs for line in out.splitlines()) == 8


def test_failed_trials_are_marked_and_a_worker_gives_up_after_max_failures(tmp_path: Path) -> None:
    study = open_study("f", tmp_path, [LR], "maximize", settings={})
    said: list[str] = []

    def objective(trial: optuna.Trial, values: dict, out: Path) -> float:
        if trial.number == 1:
            return math.nan
        raise TrialFailed(f"training exited with status 1: error: bad; log: {out / 'train.log'}")

    assert run_worker(study, [LR], 3, tmp_path, objective, max_failures=3, say=said.append) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 3
    assert (
        said[0]
        == f"trial 0 FAILED (lr=0.001): training exited with status 1: error: bad; log: {tmp_path}/trial0/train.log"
    )
    assert "score is nan" in said[1] and said[-1].startswith("3 trials failed in this worker: stopping")
    assert study.get_trials()[0].user_attrs["error"].endswith("trial0/train.log")
    with pytest.raises(
        InputError, match=r"search 'f' in .* was started with other settings \(steps: None there, 5 now\)"
    ):
        open_study("f", tmp_path, [LR], "maximize", settings={"steps": 5})


def test_a_training_stopped_by_a_signal_is_queued_again_not_counted_as_failed(tmp_path: Path) -> None:
    study = open_study("i", tmp_path, [LR], "maximize", settings={})
    said: list[str] = []
    calls: list[tuple[int, dict]] = []

    def objective(trial: optuna.Trial, values: dict, out: Path) -> float:
        calls.append((trial.number, values))
        if trial.number == 0:
            raise TrialInterrupted("training exited with status 1: error: training stopped by SIGTERM")
        return 0.5

    assert run_worker(study, [LR], 1, tmp_path, objective, max_failures=1, say=said.append) == 0
    assert calls == [(0, {"lr": 1e-3}), (1, {"lr": 1e-3})]  # the start values again, as trial 1
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.get_trials()[1].user_attrs["retry_of"] == 0
    assert said[0] == "trial 0 interrupted: marked FAIL, its parameters queued again"


# ----------------------------------------------------------------------------- the command


def test_the_command_refuses_a_wrong_setting_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    command = [sys.executable, "-m", "medseg_monai.search", "--study", "xray", "--workers", "0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)  # __main__
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: --workers must be >= 1, got 0\n"
    for argv, message in [
        (["--study", "nope"], r"error: unknown study 'nope' \(studies: brats, "),
        (
            ["--study", "xray", "--spec", str(tmp_path / "none.yaml")],
            r"error: no search spec \S*none\.yaml: ",
        ),
    ]:
        assert main([*argv, "--runs_dir", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert re.match(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- a bundle end to end

SEARCH = {
    "metric": "val_dice",
    "direction": "maximize",
    "steps": {"quick": 10, "paper": 5000},
    "parameters": {"learning_rate": None, "momentum": {"max": 0.99}},
}


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    """A copy of the X-ray bundle with the search above."""
    configs = tmp_path / "bundles" / "xray" / "configs"
    shutil.copytree(ROOT / "bundles" / "xray" / "configs", configs)
    (configs / "search.yaml").write_text(yaml.safe_dump(SEARCH))
    return tmp_path / "bundles"


def _search(bundles: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """The search of 2 trials of 10 steps, in the quick profile made tinier still (32 px): the bundle
    settings every trial gets come as --key value pairs."""
    env = local_store_env(tmp_path / "mlflow", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medseg_monai.search", "--study", "xray", "--profile", "quick"]
    cmd += [
        "--name",
        "t",
        "--trials",
        "2",
        "--bundles_dir",
        str(bundles),
        "--runs_dir",
        str(tmp_path / "runs"),
    ]
    cmd += ["--image_size", "32", "--validations_per_epoch", "2"]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, timeout=400, cwd=ROOT)


@pytest.mark.slow
def test_search_of_a_bundle_nests_trials_in_mlflow_and_draws_the_trajectory(
    bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _search(bundles, tmp_path, "--workers", "2")  # the two trials side by side
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "[2/2] trial" in result.stdout and "search 't': 2/2 trials complete; best val_dice" in result.stdout
    )
    folder = tmp_path / "runs" / "xray" / "quick" / "search" / "t"
    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4
        from optuna.storages import JournalFileStorage as JournalFileBackend
    journal = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "optuna.log")))
    study = optuna.load_study(study_name="t", storage=journal)
    trials = {t.number: t for t in study.get_trials()}
    assert sorted(trials) == [0, 1] and all(t.state == TrialState.COMPLETE for t in trials.values())
    assert trials[0].params == {"learning_rate": 1e-3, "momentum": 0.9}  # quick.yaml's values: the start
    assert trials[1].params != trials[0].params  # started beside trial 0: drawn around the start
    # 19 training images in batches of 4: 5 steps an epoch, so 10 steps are 2 epochs
    assert {(t.user_attrs["batches_per_epoch"], t.user_attrs["max_epochs"]) for t in trials.values()} == {
        (5, 2)
    }
    assert all((folder / f"trial{n}" / "train.log").is_file() for n in trials)

    client = mlflow_client(tmp_path / "mlflow")
    exp = client.get_experiment_by_name("xray")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`search.role` = 'parent'")
    assert parent.info.run_name == "search t (quick)" and parent.info.status == "FINISHED"
    assert parent.data.tags["search.metric"] == "val_dice" and parent.data.params["steps"] == "10"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        trial = trials[int(child.data.tags["search.trial"])]
        assert child.info.run_name == f"search t trial {trial.number}"
        assert float(child.data.params["learning_rate"]) == trial.params["learning_rate"]
        assert float(child.data.params["momentum"]) == trial.params["momentum"]
        assert child.data.params["max_epochs"] == "2" and child.data.params["image_size"] == "32"
        run_id = child.info.run_id
        every = metric_values(client, run_id, "val_dice") + metric_values(
            client, run_id, "val_dice_by_iteration"
        )
        assert child.data.metrics["search.score"] == pytest.approx(max(every)) == pytest.approx(trial.value)
    best = metric_values(client, parent.info.run_id, "best_score")  # by the number of trials complete
    assert len(best) == 2 and best[0] <= best[1] == pytest.approx(study.best_value)
    png = (folder / "trajectory.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trajectory.png", "trials.csv"}

    # the reproduction report draws the trajectory from the child runs
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    from medseg_monai.report import build_report

    report = build_report(tmp_path / "reports").read_text()
    assert "## Hyperparameter search: xray search 't' (quick)" in report
    assert "2 of 2 trials complete (0 failed or interrupted), 10 steps each" in report
    assert (tmp_path / "reports" / "figures" / "search-xray-quick-t.png").read_bytes().startswith(b"\x89PNG")

    # the same command again resumes: both are complete, nothing is trained or repeated
    again = _search(bundles, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 complete already" in again.stdout
    assert not any(line.startswith("[") for line in again.stdout.splitlines())
    assert len(client.search_runs([exp.experiment_id], "tags.`search.role` != ''")) == 3
