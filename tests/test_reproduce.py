"""make reproduce-all end to end on a tiny grid: report from MLflow, skipping, failures."""

from __future__ import annotations

import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bundle_utils import ROOT, local_store_env, mlflow_client
from medseg_monai.reproduce import plan

GRID = {
    "study": "xray",
    "split": "val",
    "metrics": ["dice"],
    "seeds": {"quick": [0, 1], "paper": [0]},
    "experiments": [
        {"name": "baseline", "config": "experiments/baseline.yaml", "paper": {"dice": 0.99105}},
        {
            "name": "noise_val_only",
            "config": "experiments/noise_val_only.yaml",
            "paper": {"dice": 0.6648},
            "note": "poster, exp. 1",
        },
        # the baseline under another name: run once, its twin's run copied
        {"name": "baseline_copy", "config": "experiments/baseline.yaml"},
    ],
    "figures": [{"kind": "curves", "title": "Validation Dice per epoch", "metric": "val_dice"}],
}


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    """A copy of the X-ray bundle whose reproduce.yaml is the tiny grid above."""
    configs = tmp_path / "bundles" / "xray" / "configs"
    shutil.copytree(ROOT / "bundles" / "xray" / "configs", configs)
    with (configs / "quick.yaml").open("a") as quick:  # tinier still: 2 epochs at 32 px
        quick.write("max_epochs: 2\nimage_size: 32\n")
    (configs / "reproduce.yaml").write_text(yaml.safe_dump(GRID))
    return tmp_path / "bundles"


def _reproduce(bundles: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = local_store_env(tmp_path / "mlflow")
    cmd = [
        sys.executable,
        "-m",
        "medseg_monai.reproduce",
        "--profile",
        "quick",
        "--bundles_dir",
        str(bundles),
    ]
    cmd += ["--runs_dir", str(tmp_path / "runs"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)


def _grid_runs(client, experiment: str) -> list:
    """The reproduction runs (not the report's figure run) of an MLflow experiment."""
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`reproduce.status` != ''")


def test_every_bundle_grid_plans(tmp_path: Path) -> None:
    jobs = plan("quick", runs_dir=tmp_path)
    studies = {j.study for j in jobs}
    assert "xray" in studies
    xray = [j for j in jobs if j.study == "xray"]
    assert len(xray) == 13 and {j.experiment for j in xray} >= {
        "baseline",
        "noise_val_only",
        "train_size_105",
        "cpu_real",
    }
    assert all(Path(c).is_file() for j in jobs for c in j.configs)
    assert len(plan("paper", studies=["xray"], runs_dir=tmp_path)) == 39
    brats = {j.experiment: j for j in jobs if j.study == "brats"}
    modalities = {"flair", "t1", "t1c", "t2", "flair_t1c", "flair_t1c_t2", "baseline"}
    assert set(brats) == modalities | {"cross_entropy", "no_long_skips", "single_scale", "sum_skips"}
    assert all(len(brats[m].paper) == 4 for m in modalities)  # every column: test below
    assert {"dice_wt", "dice_tc", "dice_et"} <= set(brats["baseline"].metrics)
    # the knee thesis is a draft without results: no paper figures, a note for every entry
    knee = {j.experiment: j for j in jobs if j.study == "knee"}
    assert set(knee) == {
        "baseline",
        "merged",
        "dropout_010",
        "dropout_030",
        "slices_2d",
        "patience_19",
        "lr_2e-3",
        "pooled_dice",
    }
    assert all(not j.paper and j.note.startswith("no figures") for j in knee.values())
    assert {"dice_femur", "dice_tibia", "dice_fibula", "iou_fibula"} <= set(knee["merged"].metrics)


def test_lv_grid_runs_on_acdc_where_it_is_configured(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg_monai.config import config_parser

    def datasets() -> dict[str, str]:
        jobs = plan("quick", studies=["lv"], runs_dir=tmp_path)
        return {
            j.experiment: config_parser(j.configs, j.bundle_args()).get_parsed_content("dataset")
            for j in jobs
        }

    assert set(datasets().values()) == {"lv-synthetic"}
    monkeypatch.setenv("MEDSEG_DATA_ROOT", str(shared_data))
    assert datasets() == dict.fromkeys(
        ["baseline", "cross_entropy", "batch_norm", "full_conv", "all_classes"], "acdc"
    )
    baseline = next(j for j in plan("quick", studies=["lv"], runs_dir=tmp_path) if j.experiment == "baseline")
    # the paper's one LV mask beside our whole-LV IoU, on the test split; the cardiac figures listed
    assert baseline.paper == {"iou_lv": 0.63} and baseline.split == "test"
    assert {"iou_lv", "ef_lv_mae", "ef_lv_corr", "hd95_vox"} <= set(baseline.metrics)


# The slides' Task 2 table as printed, columns "necrosis, edema, enhancing, non-enhancing"
SLIDES_TASK2 = {
    "flair": (0.19, 0.74, 0.28, 0.36),
    "t1": (0.27, 0.56, 0.26, 0.40),
    "t1c": (0.47, 0.61, 0.38, 0.74),
    "t2": (0.34, 0.69, 0.29, 0.45),
    "flair_t1c": (0.47, 0.81, 0.47, 0.78),
    "flair_t1c_t2": (0.55, 0.82, 0.49, 0.80),
    "baseline": (0.49, 0.84, 0.50, 0.80),
}
# which BRATS 2015 label each column is: label order under the authors' names, which swap 3 and 4
# (helper/get_dice.py plots channels 1-4 in order; ash.py's vis_col_im calls 3 "enhancing")
COLUMN_LABELS = (1, 2, 3, 4)


def test_brats_paper_columns_sit_on_their_brats_labels(tmp_path: Path) -> None:
    from medseg_monai.data import get_dataset

    names = get_dataset("brats2015-4class").structures  # file value -> class name
    assert (names[3], names[4]) == ("non_enhancing", "enhancing")
    jobs = {j.experiment: j for j in plan("quick", ["brats"], runs_dir=tmp_path)}
    for experiment, row in SLIDES_TASK2.items():
        expected = {f"dice_{names[label]}": v for label, v in zip(COLUMN_LABELS, row, strict=True)}
        assert jobs[experiment].paper == expected, experiment
    # T1c alone's best figure, 0.74, is on contrast-enhancing tumour, where no other single
    # modality comes near; the non-enhancing class hardly depends on the modality
    singles = ("flair", "t1", "t1c", "t2")
    assert jobs["t1c"].paper["dice_enhancing"] == 0.74 and jobs["t1c"].paper["dice_non_enhancing"] == 0.38
    assert max(singles, key=lambda m: jobs[m].paper["dice_enhancing"]) == "t1c"
    # the ablations are the hand task's (Task 1) comparisons, run by us on brain data: no figures
    for experiment in ("cross_entropy", "no_long_skips", "single_scale", "sum_skips"):
        assert not jobs[experiment].paper and "Task 1 (hand MRI)" in jobs[experiment].note
    assert all(j.split == "test" for j in jobs.values())  # not the split that chose model.pt


def test_brats_slides_table_is_transcribed_as_printed() -> None:
    slides = ROOT.parent / "shared" / "papers" / "brats-hand-cnn-segmentation-slides.txt"
    if not slides.is_file():
        pytest.skip(f"the slides' text is not at {slides}")
    lines = slides.read_text().splitlines()
    start = lines.index("Modalities\tnecrosis\tedema\tenhancing\tnon-enhancing")
    printed = {}
    for line in lines[start + 1 : start + 8]:
        name, *values = line.split("\t")
        printed[name.lower().replace(", ", "_").replace("all", "baseline")] = tuple(map(float, values))
    assert printed == SLIDES_TASK2


@pytest.mark.slow
def test_tiny_grid_end_to_end(bundles: Path, tmp_path: Path) -> None:
    first = _reproduce(bundles, tmp_path, "--jobs", "2", "--profile-time")
    out = first.stdout
    assert first.returncode == 0, out[-3000:] + first.stderr[-3000:]
    assert "[4/6] xray/noise_val_only seed 1: epoch 2/2" in out  # progress with run k of n
    assert "ETA" in out and "2 at once, 1 thread each" in out
    # two jobs at once: the second started before the first finished
    assert out.index("[2/6] xray/baseline seed 1: training") < out.index("finished (run")
    # a job whose effective config equals another's is not run twice
    assert "[5/6] xray/baseline_copy seed 0: same effective config as baseline: copied its run" in out
    assert "reproduce: 4 ran, 0 skipped, 2 copied, 0 failed" in out
    # where the time went: per job and in total, from each job's timings.json
    assert "all jobs (process seconds)" in out and "launcher: planning" in out
    assert f"cores, {torch.backends.cpu.get_cpu_capability()}" in out  # which host the seconds are from
    timings = json.loads((tmp_path / "runs/quick/xray/baseline/seed0/timings.json").read_text())["seconds"]
    assert {"start", "setup", "cache", "train", "validation", "evaluation", "mlflow"} <= set(timings)
    assert timings["train"] > 0 and timings["evaluation"] > 0
    client = mlflow_client(tmp_path / "mlflow")
    runs = _grid_runs(client, "xray")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    by = {(r.data.tags["variant"], r.data.tags["seed"]): r for r in runs}
    for seed in ("0", "1"):
        copy, source = by[("baseline_copy", seed)], by[("baseline", seed)]
        assert copy.data.tags["reproduce.same_as"] == source.info.run_id
        assert "paper.dice" in source.data.tags and "paper.dice" not in copy.data.tags  # its own figures
        assert copy.data.metrics == source.data.metrics and copy.data.params == source.data.params
        assert (Path(copy.data.tags["output_dir"]) / "model.pt").is_file()
        # the UI's Dataset and Models columns: the source's dataset input and logged model
        assert copy.inputs.dataset_inputs and [d.dataset.digest for d in copy.inputs.dataset_inputs] == [
            d.dataset.digest for d in source.inputs.dataset_inputs
        ]
        assert (
            [m.model_id for m in copy.outputs.model_outputs]
            == [m.model_id for m in source.outputs.model_outputs]
            != []
        )
    exp = client.get_experiment_by_name("xray")
    report_runs = client.search_runs([exp.experiment_id], filter_string="tags.`reproduce.report` = 'quick'")
    assert len(report_runs) == 1  # the report's figures, in MLflow too
    report = (tmp_path / "mlflow" / "reports" / "report.md").read_text()
    for name in ("baseline", "noise_val_only"):  # each row: the mean over its two seeds
        values = [r.data.metrics["eval_val_dice"] for r in runs if r.data.tags["variant"] == name]
        assert len(values) == 2
        mean, sd = statistics.mean(values), statistics.stdev(values)
        assert f"{mean:.4f} ± {sd:.4f}" in report, (name, values)
    rows = [  # the paper-beside-ours table (the statistics table below it names the same entries)
        line
        for line in report.splitlines()
        if line.startswith(("| baseline |", "| noise_val_only |")) and "(n=" in line
    ]
    assert len(rows) == 2 and "| 0.99105 |" in rows[0] and "| 0.6648 |" in rows[1]
    assert all("(n=2)" in r for r in rows)
    assert report.count("- dataset: xray-synthetic (synthetic, ") == 1  # once, above the table
    assert "check the pipeline and reproduce nothing" in report
    assert "- noise_val_only: poster, exp. 1" in report  # the grid's notes explain the paper column
    html = (tmp_path / "mlflow" / "reports" / "report.html").read_text()
    assert "data:image/png;base64," in html

    second = _reproduce(bundles, tmp_path)
    assert second.returncode == 0 and second.stdout.count("skipped") >= 6, second.stdout[-2000:]
    assert "0 ran, 6 skipped, 0 copied, 0 failed" in second.stdout
    assert len(_grid_runs(client, "xray")) == 6

    # the report is rebuilt from the store alone
    (tmp_path / "mlflow" / "reports" / "report.md").unlink()
    env = local_store_env(tmp_path / "mlflow")
    rebuilt = subprocess.run(
        [sys.executable, "-m", "medseg_monai.report"], capture_output=True, text=True, env=env, timeout=300
    )
    assert rebuilt.returncode == 0 and (tmp_path / "mlflow" / "reports" / "report.md").read_text() == report


@pytest.mark.slow
def test_failed_experiment_is_reported_and_the_rest_complete(bundles: Path, tmp_path: Path) -> None:
    configs = bundles / "xray" / "configs"
    (configs / "experiments" / "broken.yaml").write_text("experiment: broken\ndataset: no-such-dataset\n")
    (configs / "experiments" / "crashes.yaml").write_text("experiment: crashes\nweight_decay: $1 / 0\n")
    entries = [{"name": n, "config": f"experiments/{n}.yaml"} for n in ("broken", "crashes")]
    grid = dict(GRID, experiments=[*GRID["experiments"][:1], *entries])
    (configs / "reproduce.yaml").write_text(yaml.safe_dump(grid))
    result = _reproduce(bundles, tmp_path, "--seeds", "0")
    assert result.returncode == 1
    assert "xray/broken seed 0" in result.stderr and "unknown dataset 'no-such-dataset'" in result.stderr
    # a job that fails in its process names its log
    crashed = [line for line in result.stderr.splitlines() if "xray/crashes seed 0" in line]
    assert len(crashed) == 1 and "$1 / 0" in crashed[0], result.stderr  # the failing expression
    assert crashed[0].endswith(f"(log: {tmp_path / 'runs/quick/xray/crashes/seed0/reproduce.log'})")
    client = mlflow_client(tmp_path / "mlflow")
    status = {r.data.tags["variant"]: r.info.status for r in _grid_runs(client, "xray")}
    assert status == {"baseline": "FINISHED", "broken": "FAILED", "crashes": "FAILED"}
    report = (tmp_path / "mlflow" / "reports" / "report.md").read_text()
    assert "Failed runs:" in report and "broken seed 0" in report and "crashes seed 0" in report


def _complete_run(
    client: Any, experiment_id: str, variant: str, split: str, metrics: dict[str, float]
) -> str:
    """A reproduction run as the grid records it: its tags and its evaluate metrics."""
    tags = {
        "reproduce.status": "complete",
        "reproduce.profile": "quick",
        "reproduce.split": split,
        "reproduce.config_hash": "c0ffee",
        "dataset.hash": "d00d",
        "dataset.kind": "synthetic",
        "git.commit": "abc",
        "variant": variant,
        "seed": "0",
        "paper.dice": "0.8",
    }
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_report_says_which_split_each_table_is_scored_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg_monai.report import build_report, split_sentence
    from medseg_monai.reproduce import Job, _finished_run

    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    client = mlflow_client(tmp_path / "mlflow")
    brats = client.create_experiment("brats")
    wmh = client.create_experiment("wmh")
    on_test = _complete_run(client, brats, "baseline", "test", {"eval_test_dice": 0.61, "eval_val_dice": 0.9})
    _complete_run(client, wmh, "unet", "val", {"eval_val_dice": 0.55})
    _complete_run(client, wmh, "attention", "val", {"eval_val_dice": 0.57})
    _complete_run(client, wmh, "unet_test", "test", {"eval_test_dice": 0.52})

    report = build_report(tmp_path / "reports").read_text()
    brats_part, wmh_part = report.split("## wmh (quick profile)")
    assert (
        "Scored on the test split (cases that neither trained the model nor chose its checkpoint)."
        in brats_part
    )
    assert "| baseline | 0.6100 (n=1) | 0.8 | -0.1900 |" in brats_part  # the test figure, not the 0.9 of val
    assert (
        "Scored on the validation split (the cases that chose model.pt, its best epoch: a flattering "
        "figure); unet_test on the test split" in wmh_part
    )
    html = (tmp_path / "reports" / "report.html").read_text()
    assert "unet_test on the test split" in html
    assert split_sentence({"a": "all"}) == "Scored on every case (the training cases included)."

    # a run scored on another split does not count as this job's finished run
    job = Job("brats", "baseline", 0, "quick", [], "test", str(tmp_path / "out"))
    fp = {"config_hash": "c0ffee", "data_hash": "d00d"}
    assert _finished_run(client, job, fp, "abc") == on_test
    job.split = "val"
    assert _finished_run(client, job, fp, "abc") is None


_HOLD_JOB_LOCK = """
import json, sys
from medseg_monai.reproduce import Job, take_job_lock
handle, holder = take_job_lock(Job(**json.loads(sys.argv[1])))
print("held" if handle else holder, flush=True)
sys.stdin.read()  # hold it until the test closes stdin
"""


def test_a_job_another_grid_holds_is_waited_for_and_its_folder_kept(
    bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from medseg_monai.launch import LocalLauncher
    from medseg_monai.reproduce import _Grid, take_job_lock

    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    job = plan("quick", ["xray"], [0], bundles, tmp_path / "runs")[0]
    out = Path(job.output_dir)
    out.mkdir(parents=True)
    (out / ".lock").write_text("pid 1 on elsewhere")  # the other grid's job is training there
    (out / "checkpoint.pt").write_bytes(b"the other grid's")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_JOB_LOCK, json.dumps(job.__dict__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        launcher = LocalLauncher(print, preload=[])  # never asked to start anything here
        grid = _Grid([job], force=False, workers=1, threads=1, profile_time=False, launcher=launcher)
        assert grid.start(1, job) == "wait" and grid.start(1, job) == "wait"
        said = [line for line in capsys.readouterr().out.splitlines() if "held by another grid" in line]
        assert said == [
            f"[1/1] xray/baseline seed 0: {out} is held by another grid "
            f"(grid pid {holder.pid} on {platform.node()}): waiting for it"
        ]  # once, however often it looks
        assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt"]  # nothing touched
        assert (out / "checkpoint.pt").read_bytes() == b"the other grid's"
        assert grid.locks == {} and grid.held_elsewhere == {1}
    finally:
        holder.communicate("", timeout=30)
    handle, who = take_job_lock(job)  # the other grid ended: the folder is free again
    assert handle is not None and who == ""
    handle.close()


@pytest.mark.slow
def test_two_grids_at_once_share_the_jobs(bundles: Path, tmp_path: Path) -> None:
    grid = dict(GRID, experiments=GRID["experiments"][:2])  # baseline and noise_val_only
    (bundles / "xray" / "configs" / "reproduce.yaml").write_text(yaml.safe_dump(grid))
    from medseg_monai.reproduce import fingerprint

    fingerprint(plan("quick", ["xray"], [0], bundles, tmp_path / "runs")[0])  # the synthetic data, made once
    # no git state (both grids see "unknown"): in a shared checkout a commit landing while the grids
    # run would make the first grid's finished run stale for the second, which then retrains it
    env = local_store_env(tmp_path / "mlflow", GIT_DIR=str(tmp_path / "no-git"))
    cmd = [sys.executable, "-m", "medseg_monai.reproduce", "--profile", "quick", "--seeds", "0"]
    cmd += ["--jobs", "1", "--bundles_dir", str(bundles), "--runs_dir", str(tmp_path / "runs"), "--no_report"]
    grids = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for _ in range(2)
    ]
    results = [(g.communicate(timeout=900), g.returncode) for g in grids]
    for (stdout, stderr), code in results:
        assert code == 0, stdout[-3000:] + stderr[-3000:]
    outs = [stdout for (stdout, _), _ in results]
    both = "\n".join(outs)
    # each job trained by one grid; the other waited for it, said so, then skipped it as done
    ran = sum(int(re.search(r"reproduce: (\d+) ran", o).group(1)) for o in outs)
    skipped = sum(int(re.search(r"(\d+) skipped", o).group(1)) for o in outs)
    assert (ran, skipped) == (2, 2), both
    assert "held by another grid (grid pid" in both and "FAILED" not in both
    client = mlflow_client(tmp_path / "mlflow")
    runs = _grid_runs(client, "xray")
    assert sorted(r.data.tags["variant"] for r in runs) == ["baseline", "noise_val_only"]  # no duplicate
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:  # each evaluated once, by the grid that trained it
        assert len(client.get_metric_history(r.info.run_id, "eval_val_dice")) == 1, r.data.tags
        assert (Path(r.data.tags["output_dir"]) / "model.pt").is_file()
