"""Results in the right place, and interruptions that say what to do next (issue #41, items 4, 5, 7, 8):
an evaluation writes beside the checkpoint it evaluates (or into --output_dir), one metrics file per
split, all or nothing; a split the model trained on is not scored as held out; a start that failed
before its first epoch does not block its retry; Ctrl-C, SIGTERM and SIGHUP end a run with the right
next step, and a failed resume leaves a KILLED run KILLED.

The CLI cases run the X-ray bundle's quick profile at 32 px and check the exit status, the single
``error:`` line, what is left on disk and what MLflow says; the unit cases check the pieces by hand."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events, State

from bundle_utils import (
    ROOT,
    error_lines,
    local_store_env,
    mlflow_client,
    run_bundle,
    run_python_module,
    train_quick,
)
from medseg_monai import record
from medseg_monai.config import command_line, config_files
from medseg_monai.errors import InputError, RunInterrupted
from medseg_monai.handlers import EvaluationResults
from medseg_monai.io import write_json

TINY = {"image_size": 32, "dataset": "xray-synthetic"}


def _launch(store: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m medseg_monai.bundle xray <args>`` against the MLflow store in ``store``."""
    argv = [sys.executable, "-m", "medseg_monai.bundle", "xray", *args]
    return run_python_module(argv, local_store_env(store), 600)


def _start(store: Path, mode: str = "train", **overrides: object) -> subprocess.Popen:
    """A quick X-ray bundle run in a process of its own, to send signals to."""
    files = config_files("xray", mode, profile="quick")
    args = command_line(
        files, **TINY, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
    )
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=local_store_env(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, done: object, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"waited {timeout} s"
        time.sleep(0.02)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _run(store: Path, folder: Path) -> object:
    return mlflow_client(store).get_run(json.loads((folder / "mlflow_run.json").read_text())["run_id"])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained_on_all(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One epoch of the tiny X-ray training with ``--train_split all`` (the quick profile's 20 of the
    120 images, drawn from the train and val parts): its folder and store."""
    return train_quick("xray", tmp_path_factory, max_epochs=1, train_split="all", **TINY)


# ----------------------------------------------------------------------------- 4. results in the right place


@pytest.mark.slow
def test_a_copied_run_is_evaluated_beside_the_copy_one_metrics_file_per_split(
    trained_on_all: tuple[Path, Path], tmp_path: Path
) -> None:
    out, store = trained_on_all
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    original = _files(out)
    trained = json.loads((out / "run.json").read_text())["dataset"]["cases"]
    ckpt = str(copy / "model.pt")
    on_train = _launch(store, "--mode", "evaluate", "--ckpt_path", ckpt, "--split", "train")
    assert on_train.returncode == 0, on_train.stderr[-3000:]
    on_val = _launch(
        store, "--mode", "evaluate", "--ckpt_path", ckpt, "--split", "val", "--allow_train_overlap", "true"
    )
    assert on_val.returncode == 0, on_val.stderr[-3000:]
    assert _files(out) == original  # nothing of either evaluation in the folder the copy came from
    by_split = {s: json.loads((copy / f"metrics_{s}.json").read_text()) for s in ("train", "val")}
    scored = {
        s: json.loads((copy / f"eval_{s}_run.json").read_text())["dataset"]["cases"][s] for s in by_split
    }
    assert [len(scored["train"]), len(scored["val"]), len(trained["train"])] == [108, 12, 20]
    for split, metrics in by_split.items():
        assert sorted(metrics["cases"]) == sorted(scored[split])
    overlap = len(set(scored["val"]) & set(trained["train"]))  # validation images that trained it
    assert (copy / "metrics.json").read_bytes() == (copy / "metrics_val.json").read_bytes()  # the latest
    assert not list(copy.glob(".eval_*"))
    # MLflow: the original run untouched; each evaluation of the copy has a run of its own
    client = mlflow_client(store)
    run = _run(store, out)
    assert run.info.status == "FINISHED" and not [k for k in run.data.metrics if k.startswith("eval_")]
    evaluations = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.output_dir = '{copy}'",
        order_by=["attributes.start_time"],
    )
    assert [r.info.status for r in evaluations] == ["FINISHED", "FINISHED"]
    assert evaluations[0].data.metrics["eval_train_dice"] == pytest.approx(by_split["train"]["mean"]["dice"])
    assert evaluations[1].data.metrics["eval_val_dice"] == pytest.approx(by_split["val"]["mean"]["dice"])
    assert evaluations[1].data.tags.get("eval_val_train_overlap") == (
        f"{overlap} of 12 cases trained on" if overlap else None
    )
    assert "eval_train_train_overlap" not in evaluations[0].data.tags  # train is scored knowingly
    # without the launcher, a checkpoint outside the default output_dir needs --output_dir
    direct = run_bundle("xray", store, mode="evaluate", ckpt_path=copy / "model.pt", split="train", **TINY)
    assert direct.returncode != 0 and "Traceback" not in direct.stderr
    assert error_lines(direct) == [
        f"error: the checkpoint {copy / 'model.pt'} is not in output_dir "
        f"{ROOT / 'runs/xray/quick/baseline/seed0'}, where this evaluation would write: pass --output_dir "
        f"{copy} (beside it) or another folder"
    ], direct.stderr[-2000:]


@pytest.mark.slow
def test_an_interrupted_evaluation_leaves_the_previous_results_as_they_were(
    trained_on_all: tuple[Path, Path], tmp_path: Path
) -> None:
    out, store = trained_on_all
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    first = run_bundle("xray", store, mode="evaluate", output_dir=folder, split="train", **TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _files(folder)
    assert {"metrics.json", "metrics_train.json", "eval_train_run.json"} <= set(before)
    record_file = folder / "eval_train_run.json"
    stamp = record_file.stat().st_mtime_ns
    proc = _start(store, "evaluate", output_dir=folder, split="train")
    _wait_for(proc, lambda: record_file.stat().st_mtime_ns != stamp)  # the new record is written
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None) and "Traceback" not in stderr
    assert _errors(stderr) == [
        f"error: evaluation of the train split stopped by SIGTERM: the previous results of the train split "
        f"in {folder} are as they were; run the same command again to evaluate it"
    ], stderr[-2000:]
    assert _files(folder) == before and not list(folder.glob(".eval_*"))
    # the copy's evaluations each had an MLflow run: the completed one FINISHED, the stopped one KILLED
    client = mlflow_client(store)
    experiment = client.get_experiment_by_name("xray").experiment_id
    runs = client.search_runs(
        [experiment], filter_string=f"tags.output_dir = '{folder}'", order_by=["attributes.start_time"]
    )
    assert [r.info.status for r in runs] == ["FINISHED", "KILLED"]
    assert not [k for k in runs[1].data.metrics if k.startswith("eval_")]


def _old_results(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    write_json({"mean": {"dice": 0.5}, "cases": {"a": {"dice": 0.5}}}, folder / "metrics_val.json")
    write_json({"mean": {"dice": 0.25}, "cases": {"b": {"dice": 0.25}}}, folder / "metrics.json")  # of test
    write_json({"dataset": {"cases": {"val": ["a"]}}}, folder / "eval_val_run.json")
    (folder / "run.json").write_text("{}")  # the training's: not the evaluation's to touch
    return _files(folder)


class _Evaluator(Engine):
    """An evaluator of 4 cases (``run()`` without data, as MONAI's) that writes what an evaluation
    of 'val' writes: its record at the start, its metrics at the end; with ``stop_at`` it sends
    itself SIGTERM during that case."""

    def __init__(self, folder: Path, stop_at: int | None = None) -> None:
        super().__init__(self._step)
        self.stop_at = stop_at
        new = {"mean": {"dice": 0.9}, "cases": {"a": {"dice": 0.9}}}
        self.add_event_handler(Events.STARTED, lambda _: write_json({"new": 1}, folder / "eval_val_run.json"))
        self.add_event_handler(Events.EPOCH_COMPLETED, lambda _: write_json(new, folder / "metrics_val.json"))

    def _step(self, engine: Engine, batch: int) -> None:
        if engine.state.iteration == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def run(self) -> State:  # type: ignore[override]
        return super().run(range(4), max_epochs=1)


def test_evaluation_results_are_all_or_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    old = _old_results(folder)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]
    results = EvaluationResults(str(folder), "val", "eval_val_")
    results.set_aside()
    engine = _Evaluator(folder, stop_at=2)
    results.attach(engine)
    with pytest.raises(RunInterrupted) as stopped:
        results.run(engine)
    assert str(stopped.value) == (
        f"evaluation of the val split stopped by SIGTERM: the previous results of the val split in "
        f"{folder} are as they were; run the same command again to evaluate it"
    )
    assert engine.state.iteration == 2 and _files(folder) == old and not list(folder.glob(".eval_*"))
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)] == handlers
    # completed: the new files, metrics.json its copy, nothing set aside left
    results = EvaluationResults(str(folder), "val", "eval_val_")
    results.set_aside()
    engine = _Evaluator(folder)
    results.attach(engine)
    results.run(engine)
    now = _files(folder)
    assert (
        json.loads(now["metrics_val.json"])["mean"]["dice"] == 0.9
        and now["metrics.json"] == now["metrics_val.json"]
    )
    assert now["run.json"] == b"{}" and not list(folder.glob(".eval_*"))


def test_a_killed_evaluations_leftovers_are_put_back_by_the_next(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    old = _old_results(folder)
    killed = EvaluationResults(str(folder), "val", "eval_val_")
    killed.set_aside()
    killed._restore_signals()  # its process is gone, and its signal handlers with it
    write_json({"new": True}, folder / "eval_val_run.json")  # it wrote its record, then kill -9
    (folder / "eval_val_overlay.png").write_bytes(b"half")
    assert (folder / ".eval_val_previous" / "metrics_val.json").is_file()
    nxt = EvaluationResults(str(folder), "val", "eval_val_")
    nxt.set_aside()
    nxt._restore_signals()
    assert _files(folder) == old and nxt.had_results


# ----------------------------------------------------------------------------- 5. no training case scored as test


def test_train_overlap_is_read_from_the_training_record(tmp_path: Path) -> None:
    write_json(
        {"dataset": {"id": "xray-synthetic", "cases": {"train": ["a", "b", "c"], "val": ["v"]}}},
        tmp_path / "run.json",
    )
    ckpt = tmp_path / "model.pt"
    cases = [{"case_id": c} for c in ("b", "c", "d")]
    with pytest.raises(InputError) as refused:
        record.train_overlap(ckpt, "xray-synthetic", "val", cases)
    assert str(refused.value).startswith(
        f"2 of the 3 cases of split 'val' (b, c) trained the model {ckpt} ({tmp_path / 'run.json'}): "
    ) and str(refused.value).endswith(
        "pass --allow_train_overlap true to score them anyway (the MLflow run is then tagged)"
    )
    assert record.train_overlap(ckpt, "xray-synthetic", "val", cases, allow=True) == ["b", "c"]
    assert record.train_overlap(ckpt, "xray-synthetic", "train", cases) == []  # asked for by name
    assert record.train_overlap(ckpt, "xray-synthetic", "val", [{"case_id": "v"}]) == []
    assert record.train_overlap(ckpt, "jsrt-scr", "val", cases) == []  # another dataset's cases
    assert record.train_overlap(tmp_path / "elsewhere" / "model.pt", "xray-synthetic", "val", cases) == []


@pytest.mark.slow
def test_a_split_the_model_trained_on_is_refused(trained_on_all: tuple[Path, Path], tmp_path: Path) -> None:
    out, store = trained_on_all
    before = _files(out)
    evaluation = tmp_path / "eval"
    result = run_bundle(  # 'all' holds every case the model trained on
        "xray", store, mode="evaluate", ckpt_path=out / "model.pt", output_dir=evaluation, split="all", **TINY
    )
    lines = error_lines(result)
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr[
        -2000:
    ]
    assert (
        lines[0].startswith("error: 20 of the 120 cases of split 'all' (")
        and "--allow_train_overlap true" in lines[0]
    )
    assert not evaluation.exists() and _files(out) == before
    assert not [k for k in _run(store, out).data.metrics if k.startswith("eval_")]


# ----------------------------------------------------------------------------- 7. a failed start does not block its retry


def test_only_a_folder_with_results_is_protected(tmp_path: Path) -> None:
    started = tmp_path / "started"
    started.mkdir()
    write_json(
        {"experiment": "baseline", "seed": 0, "profile": "quick", "started": "then"}, started / "run.json"
    )
    (started / "config.json").write_text("{}")
    record.claim_output_dir(started, resume=False, overwrite=False)  # never finished an epoch: replaced
    assert sorted(p.name for p in started.iterdir()) == [".lock"]
    with pytest.raises(InputError, match=r"nothing to resume in .*: no run was started there"):
        record.claim_output_dir(started, resume=True, overwrite=False)
    for result in ("checkpoint.pt", "model_final.pt", "metrics_val.json"):
        kept = tmp_path / result
        kept.mkdir()
        write_json(
            {"experiment": "baseline", "seed": 0, "profile": "quick", "started": "then"}, kept / "run.json"
        )
        (kept / result).write_bytes(b"x")
        with pytest.raises(
            InputError, match=r"holds the results of run 'baseline seed0' \(quick profile, started then\)"
        ):
            record.claim_output_dir(kept, resume=False, overwrite=False)
        assert (kept / result).is_file()


@pytest.mark.slow
def test_a_start_that_failed_does_not_block_the_corrected_command(tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    failed = run_bundle("xray", store, output_dir=out, max_epochs=1, batch_size=0, **TINY)
    assert failed.returncode != 0 and not (out / "checkpoint.pt").exists()
    corrected = run_bundle("xray", store, output_dir=out, max_epochs=1, **TINY)
    assert corrected.returncode == 0, corrected.stderr[-3000:]
    assert (out / "checkpoint.pt").is_file() and (out / "model_final.pt").is_file()
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4
    assert _run(store, out).info.status == "FINISHED"


# ----------------------------------------------------------------------------- 8. Ctrl-C and hang-ups


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_ends_says_start_over_and_a_failed_resume_keeps_killed(
    tmp_path: Path,
) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    proc = _start(store, output_dir=out, max_epochs=1, train_size=100)  # 25 iterations in epoch 1
    _wait_for(proc, lambda: (out / "mlflow_run.json").is_file())  # the tracker opened the run
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None) and "Traceback" not in stderr
    assert _errors(stderr) == [
        f"error: training stopped by SIGINT during epoch 1, before any epoch was complete: nothing in {out} "
        "to resume; run the same command again to start over"
    ], stderr[-2000:]
    assert _run(store, out).info.status == "KILLED" and not (out / "checkpoint.pt").exists()
    # --resume true is refused before MLflow is touched
    resumed = run_bundle("xray", store, output_dir=out, max_epochs=1, train_size=100, resume=True, **TINY)
    started = json.loads((out / "run.json").read_text())["started"]
    assert resumed.returncode != 0 and error_lines(resumed) == [
        f"error: nothing to resume in {out}: run 'baseline seed0' (quick profile, started {started}) stopped "
        "before its first epoch ended (checkpoint.pt is saved when an epoch completes): start the run "
        "without --resume true"
    ], resumed.stderr[-2000:]
    assert _run(store, out).info.status == "KILLED"
    # a checkpoint that does not load: the resume fails after the tracker reopened the run, which stays KILLED
    torch.save({"objects": {}}, out / "checkpoint.pt")
    broken = run_bundle("xray", store, output_dir=out, max_epochs=1, train_size=100, resume=True, **TINY)
    lines = error_lines(broken)
    assert broken.returncode != 0 and len(lines) == 1 and str(out / "checkpoint.pt") in lines[0], (
        broken.stderr[-2000:]
    )
    assert _run(store, out).info.status == "KILLED"


@pytest.mark.slow
def test_sighup_stops_a_training_as_sigterm_does(tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    proc = _start(store, output_dir=out, max_epochs=50)
    _wait_for(proc, lambda: (out / "checkpoint.pt").is_file())
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    lines = _errors(stderr)
    assert proc.returncode not in (0, None) and "Traceback" not in stderr and len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("error: training stopped by SIGHUP during epoch ")
    assert lines[0].endswith(f"the last complete epoch is checkpointed in {out}: continue with --resume true")
    assert _run(store, out).info.status == "KILLED"
    assert (out / "checkpoint.pt").is_file() and not (out / "model_final.pt").exists()
