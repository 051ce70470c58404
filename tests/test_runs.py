"""Runs a user can trust: no overwritten results, one process per folder, killed runs recorded as
killed and resumed exactly, evaluation that never changes a training's status.

Each case runs the real CLI (the X-ray bundle's quick profile at 32 px) and checks the exit
status, the single ``error:`` line, what is left on disk and what MLflow says.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bundle_utils import ROOT, error_lines, local_store_env, mlflow_client, parse_study, run_bundle
from medseg_monai import record
from medseg_monai.config import command_line, config_files

TINY = {"image_size": 32, "dataset": "xray-synthetic"}


def _start(out: Path, store: Path, **overrides: object) -> subprocess.Popen:
    args = command_line(config_files("xray", profile="quick"), output_dir=str(out), **TINY, **overrides)
    env = local_store_env(store)
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _checkpoint_epoch(out: Path) -> int:
    """The last complete epoch in the run's checkpoint (Ignite keeps the iteration count)."""
    try:
        trainer = torch.load(out / "checkpoint.pt", weights_only=False)["objects"]["trainer"]
    except (OSError, EOFError, RuntimeError, KeyError):
        return 0
    return trainer["iteration"] // trainer["epoch_length"]


def _wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _checkpoint_epoch(out) < epoch:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} in {timeout} s"
        time.sleep(0.05)


def _run(store: Path, out: Path) -> object:
    client = mlflow_client(store)
    return client.get_run(json.loads((out / "mlflow_run.json").read_text())["run_id"])


def _history(store: Path, out: Path, metric: str) -> list[tuple[int, float]]:
    client = mlflow_client(store)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def test_profile_is_part_of_the_default_output_dir_and_run_name() -> None:
    full, quick = parse_study("xray"), parse_study("xray", profile="quick")
    assert full.get_parsed_content("output_dir").endswith("runs/xray/paper/baseline/seed0")
    assert quick.get_parsed_content("output_dir").endswith("runs/xray/quick/baseline/seed0")
    tracker = quick.get_parsed_content("train#handlers#0")
    assert tracker.run_name == "baseline seed0 (quick)"
    assert full.get_parsed_content("train#handlers#0").run_name == "baseline seed0"


def test_a_run_on_another_dataset_than_the_default_is_named_after_it(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSRT quick run and a synthetic one get different folders and MLflow run names: the dataset
    joins them when it is not the study's default (the default's names stay as they were)."""
    jsrt = parse_study("xray", profile="quick", dataset="jsrt-scr", data_root=str(shared_data / "jsrt-scr"))
    assert jsrt.get_parsed_content("output_dir").endswith("runs/xray/quick/jsrt-scr/baseline/seed0")
    assert jsrt.get_parsed_content("train#handlers#0").run_name == "baseline seed0 (quick, jsrt-scr)"
    paper = parse_study(
        "xray", dataset="jsrt-scr", data_root=str(shared_data / "jsrt-scr"), fold=2, fold_pool="all"
    )
    assert paper.get_parsed_content("output_dir").endswith("runs/xray/paper/jsrt-scr/baseline/seed0_fold2")
    assert paper.get_parsed_content("train#handlers#0").run_name == "baseline seed0 fold2 (jsrt-scr)"
    synthetic = parse_study("xray", profile="quick", dataset="xray-synthetic")
    assert synthetic.get_parsed_content("output_dir").endswith("runs/xray/quick/baseline/seed0")
    # with JSRT under MEDSEG_DATA_ROOT it is the default, and the synthetic run is the one named
    monkeypatch.setenv("MEDSEG_DATA_ROOT", str(shared_data))
    assert (
        parse_study("xray", profile="quick")
        .get_parsed_content("output_dir")
        .endswith("runs/xray/quick/baseline/seed0")
    )
    synthetic = parse_study("xray", profile="quick", dataset="xray-synthetic")
    assert synthetic.get_parsed_content("output_dir").endswith(
        "runs/xray/quick/xray-synthetic/baseline/seed0"
    )
    assert (
        synthetic.get_parsed_content("train#handlers#0").run_name == "baseline seed0 (quick, xray-synthetic)"
    )


def test_an_unknown_dataset_never_names_a_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        command_line(config_files("xray", profile="quick"), dataset="../../elsewhere"),
        cwd=ROOT, env=local_store_env(tmp_path / "mlflow"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = error_lines(result)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "unknown dataset '../../elsewhere'" in errors[0]
    assert not (ROOT / "runs" / "xray" / "quick" / "elsewhere").exists()


@pytest.mark.slow
def test_a_folder_with_results_is_not_overwritten(tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    first = run_bundle("xray", store, output_dir=out, max_epochs=1, **TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    model = (out / "model.pt").read_bytes()
    again = run_bundle("xray", store, output_dir=out, max_epochs=1, seed=5, **TINY)
    assert again.returncode != 0
    lines = error_lines(again)
    assert (
        len(lines) == 1
        and f"output_dir {out} holds the results of run 'baseline seed0' (quick profile" in lines[0]
    )
    assert "--resume true" in lines[0] and "--overwrite true" in lines[0] and "Traceback" not in again.stderr
    assert (out / "model.pt").read_bytes() == model and json.loads((out / "run.json").read_text())[
        "seed"
    ] == 0
    replaced = run_bundle("xray", store, output_dir=out, max_epochs=1, seed=5, overwrite=True, **TINY)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["seed"] == 5


@pytest.mark.slow
def test_a_second_process_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    record.lock_output_dir(out)  # this process holds the folder, as a running training would
    try:
        result = run_bundle("xray", tmp_path / "mlflow", output_dir=out, max_epochs=1, **TINY)
    finally:
        record._LOCKS.pop(out.resolve()).close()
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and f"output_dir {out} is in use by pid {os.getpid()}" in lines[0], result.stderr[
        -2000:
    ]
    assert not (out / "run.json").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_marks_killed_and_exits_nonzero(tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    proc = _start(out, store, max_epochs=200)
    _wait_for_epoch(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "training stopped by SIGTERM" in lines[0] and "--resume true" in lines[0], (
        stderr[-2000:]
    )
    assert "Traceback" not in stderr
    assert _run(store, out).info.status == "KILLED"
    assert _checkpoint_epoch(out) >= 1 and not (out / "model_final.pt").exists()
    # evaluating what the run saved leaves its status alone and adds prefixed metrics
    evaluated = run_bundle("xray", store, mode="evaluate", output_dir=out, **TINY)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    run = _run(store, out)
    assert run.info.status == "KILLED" and "eval_val_dice" in run.data.metrics
    assert not any(k.startswith("n_eval") for k in run.data.params)


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    # killed within the first half: on a fast host a tiny epoch takes a fraction of a second, and a
    # kill after the last-but-one epoch's checkpoint found the run already FINISHED
    epochs = 8
    whole, store = tmp_path / "whole", tmp_path / "mlflow"
    reference = run_bundle("xray", store, output_dir=whole, max_epochs=epochs, **TINY)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    proc = _start(out, store, max_epochs=epochs)
    _wait_for_epoch(proc, out, random.Random().randint(1, epochs // 2))
    proc.kill()  # SIGKILL: nothing runs on the way out
    proc.communicate(timeout=60)
    assert _run(store, out).info.status == "RUNNING"  # what a killed process leaves behind

    refused = run_bundle("xray", store, output_dir=out, max_epochs=epochs, **TINY)
    assert refused.returncode != 0 and "--resume true" in error_lines(refused)[0]
    assert _run(store, out).info.status == "KILLED"  # the next start saw the dead run

    resumed = run_bundle("xray", store, output_dir=out, max_epochs=epochs, resume=True, **TINY)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = _run(store, out)
    assert run.info.status == "FINISHED"
    for metric in ("val_dice", "train_loss", "lr"):
        expected = _history(store, whole, metric)
        got = dict(_history(store, out, metric))  # the killed epoch may be logged twice: same values
        assert len(expected) == epochs and [got[step] for step, _ in expected] == [v for _, v in expected], (
            metric
        )
    for name in ("model.pt", "model_final.pt"):
        a, b = torch.load(whole / name), torch.load(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_validating_more_often_does_not_change_the_training(tmp_path: Path) -> None:
    """The validation loader draws its seeds from its own generator: a run validated every epoch and
    one validated every second epoch train the same model (same losses, same Dice where both
    validate). Without that, each validation pass moved the global stream, and with it the data
    order and dropout of every epoch after it. (X-ray's plateau scheduler steps on validation, but its
    patience of 5 does not act within 4 epochs.)"""
    runs = {}
    for every in (1, 2):
        out, store = tmp_path / f"every{every}", tmp_path / f"mlflow{every}"
        result = run_bundle("xray", store, output_dir=out, max_epochs=4, val_interval=every, **TINY)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[every] = {m: dict(_history(store, out, m)) for m in ("train_loss", "val_dice")}
    assert runs[1]["train_loss"] == runs[2]["train_loss"] and len(runs[1]["train_loss"]) == 4
    assert sorted(runs[2]["val_dice"]) == [2, 4] and len(runs[1]["val_dice"]) == 4
    assert all(runs[2]["val_dice"][e] == runs[1]["val_dice"][e] for e in (2, 4))


def test_a_timed_grid_job_trains_the_model_the_command_line_trains(tmp_path: Path) -> None:
    """``reproduce`` runs a job in process with a stopwatch, which resolves the datasets and engines
    ahead of the run to time them. MONAI's DataLoader reseeds torch's global stream when created, so
    resolving in another order than the run (the evaluator's network before the trainer's loader)
    trained another model than the command line: the same config gave BraTS validation Dice 0.10
    against 0.00 at epoch 3. Timed and untimed runs must give the same losses, Dice and weights."""
    cli_out, cli_store = tmp_path / "cli", tmp_path / "mlflow_cli"
    result = run_bundle("xray", cli_store, output_dir=cli_out, max_epochs=2, **TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    timed_out, timed_store = tmp_path / "timed", tmp_path / "mlflow_timed"
    overrides = {"output_dir": str(timed_out), "max_epochs": 2, **TINY}
    code = (
        "from medseg_monai.bundle import run\nfrom medseg_monai.config import config_files\n"
        "from medseg_monai.timing import Stopwatch\n"
        f"run(config_files('xray', profile='quick'), stopwatch=Stopwatch(), **{overrides!r})\n"
    )
    env = local_store_env(timed_store)
    timed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert timed.returncode == 0, timed.stderr[-3000:]
    for metric in ("train_loss", "val_dice"):
        cli, other = _history(cli_store, cli_out, metric), _history(timed_store, timed_out, metric)
        assert cli == other and len(cli) == 2, metric
    a, b = torch.load(cli_out / "model_final.pt"), torch.load(timed_out / "model_final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--max_epoch", "1"],
            "unknown setting 'max_epoch' (--max_epoch) for bundles/xray/configs/train.yaml: did you mean 'max_epochs'?",
        ),
        (["--max_epochs", "abc"], "max_epochs must be a positive whole number, got 'abc'"),
        (["--max_epochs", "0"], "max_epochs must be a positive whole number, got 0"),
        (["--val_interval", "0"], "val_interval must be a positive whole number, got 0"),
        (
            ["--validations_per_epoch", "1.5"],
            "validations_per_epoch must be a positive whole number, got 1.5",
        ),
        (["--seed", "1.5"], "seed must be a whole number, got 1.5"),
        (["--resume", "maybe"], "resume must be true or false, got 'maybe'"),
        (["--network_def#featurs", "[1]"], "did you mean 'network_def#features'?"),
        (
            ["--loss#batch", "false"],  # the text 'false' would reach DiceCELoss as batch=True
            "loss#batch is true or false: write --loss#batch True or --loss#batch False, got 'false'",
        ),
    ],
)
def test_wrong_settings_are_refused_before_anything_runs(args: list[str], expected: str) -> None:
    from medseg_monai.errors import InputError
    from medseg_monai.runtime import check_command_line

    argv = ["monai.bundle", "run", "--config_file", "['bundles/xray/configs/train.yaml']", *args]
    with pytest.raises(InputError) as caught:
        check_command_line(argv)
    assert expected in str(caught.value)


def test_true_false_settings_pass_when_written_as_python() -> None:
    from medseg_monai.runtime import check_command_line

    argv = ["monai.bundle", "run", "--config_file", "['bundles/xray/configs/train.yaml']"]
    check_command_line([*argv, "--loss#batch", "False", "--resume", "false", "--fast", "true"])


def test_flags_are_read_strictly() -> None:
    from medseg_monai.runtime import flag

    assert flag("true", "x") is True and flag("False", "x") is False and flag(True, "x") is True
    assert flag("false", "overwrite") is False  # the string 'false' must never count as true


def test_an_mlflow_server_that_does_not_answer_is_refused_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg_monai.errors import InputError
    from medseg_monai.tracking import check_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(InputError, match=r"MLFLOW_TRACKING_URI=http://127.0.0.1:9 does not answer .*unset"):
        check_tracking_uri(timeout=2)
    assert time.monotonic() - start < 10


def test_a_real_folder_given_to_the_synthetic_dataset_is_refused(shared_data: Path) -> None:
    from medseg_monai.data import DatasetError, load_splits

    with pytest.raises(
        DatasetError, match=r"holds no generated data .*it looks like 'jsrt-scr': pass --dataset jsrt-scr"
    ):
        load_splits("xray-synthetic", shared_data / "jsrt-scr")
    with pytest.raises(
        DatasetError, match=r"it looks like 'brats2015-4class': pass --dataset brats2015-4class"
    ):
        load_splits("brats2018", shared_data / "brats2015-4class")


@pytest.mark.slow
def test_mixups_and_mistakes_on_the_command_line_are_one_line(tmp_path: Path, shared_data: Path) -> None:
    # the headline case: a JSRT folder without --dataset used to train with the synthetic settings
    mixed = run_bundle("xray", tmp_path / "m", data_root=shared_data / "jsrt-scr", output_dir=tmp_path / "a")
    assert mixed.returncode != 0 and not (tmp_path / "a" / "run.json").exists()
    assert [ln for ln in error_lines(mixed) if "pass --dataset jsrt-scr" in ln] == error_lines(mixed)
    typo = run_bundle("xray", tmp_path / "m", max_epoch=1, output_dir=tmp_path / "b")
    assert typo.returncode != 0 and len(error_lines(typo)) == 1 and "did you mean 'max_epochs'" in typo.stderr
    for result in (mixed, typo):
        assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_a_quick_checkpoint_is_evaluated_with_its_own_settings(tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    trained = run_bundle("xray", store, output_dir=out, max_epochs=1, **TINY)
    assert trained.returncode == 0, trained.stderr[-2000:]
    log = trained.stdout + trained.stderr
    assert "xray/baseline seed 0, quick profile, on cpu: dataset xray-synthetic (synthetic" in log
    assert "epoch 1/1: train_loss" in log and "| val dice" in log
    # without the quick layer the paper-sized network does not fit the quick checkpoint: one line
    plain = run_bundle(
        "xray", store, mode="evaluate", profile=None, ckpt_path=out / "model.pt", output_dir=tmp_path / "e1"
    )
    assert plain.returncode != 0 and len(error_lines(plain)) == 1, plain.stderr[-2000:]
    assert (
        "does not fit this network" in plain.stderr
        and "python -m medseg_monai.bundle xray --mode evaluate" in plain.stderr
    )
    # the launcher reads the run's config.json beside the checkpoint
    env = local_store_env(store)
    launched = subprocess.run(
        [sys.executable, "-m", "medseg_monai.bundle", "xray", "--mode", "evaluate", "--ckpt_path", str(out / "model.pt"), "--output_dir", str(tmp_path / "e2")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "using the settings the checkpoint was trained with" in launched.stderr
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["mean"]["dice"] >= 0


def test_monai_input_summary_keeps_the_settings_and_drops_its_empty_frame() -> None:
    import logging

    from medseg_monai.runtime import tidy_logs

    tidy_logs()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("monai.bundle.scripts")  # where MONAI logs it, after our initialize
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        for message in ("--- input summary of monai.bundle.scripts.run ---", "> max_epochs: 2", "---\n\n"):
            log.info(message)
        log.info("--- input summary of monai.bundle.scripts.run ---")
        log.info("---\n\n")  # no overrides: nothing at all
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert seen == ["setting max_epochs: 2"]


def test_loading_says_nothing_about_nvidias_dicom_decoder_once_logs_are_tidied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With pydicom installed (the [dicom] extra) every LoadImage MONAI builds logged that the GPU
    decoder nvImageCodec is missing and warned that its plugin did not register."""
    import logging
    import warnings

    pytest.importorskip("pydicom")
    from monai.transforms import LoadImage

    from medseg_monai.runtime import tidy_logs

    tidy_logs()
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
        LoadImage(image_only=True)
    said = [str(w.message) for w in seen] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "nvImageCodec" in m], said
