"""python -m medseg_monai.compare on run folders and an MLflow store written here, and the
report's table against the baseline; figures checked against hand values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_utils import ROOT
from medseg_monai.compare import headline_metric, main

# B's per-case Dice of the heart and A - B per case: six positive, distinct differences
B = {"c1": 0.80, "c2": 0.75, "c3": 0.68, "c4": 0.56, "c5": 0.82, "c6": 0.69}
D = {"c1": 0.10, "c2": 0.05, "c3": 0.02, "c4": 0.04, "c5": 0.03, "c6": 0.06}
A = {c: B[c] + D[c] for c in B}


def _run_folder(folder: Path, heart: dict[str, float], split: str | None = "val", **extra: float) -> Path:
    """A run folder as evaluate leaves it: metrics.json and, with ``split``, eval_<split>_run.json."""
    folder.mkdir(parents=True)
    cases = {c: {"dice": v, "dice_heart": v, **extra} for c, v in heart.items()}
    mean = {"dice": sum(heart.values()) / len(heart), "pooled_recall": 0.5}
    (folder / "metrics.json").write_text(json.dumps({"mean": mean, "cases": cases}))
    if split:
        record = {"study": "xray", "dataset": {"id": "xray-synthetic", "cases": {split: list(heart)}}}
        (folder / f"eval_{split}_run.json").write_text(json.dumps(record))
    return folder


def _compare(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_two_run_folders_figures_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _run_folder(tmp_path / "a", A)
    b = _run_folder(tmp_path / "b", B)
    out_json = tmp_path / "out.json"
    code, out, err = _compare(capsys, a, b, "--metric", "dice_heart", "--output", out_json)
    assert code == 0, err
    # B: mean 4.30 / 6 = 0.716667; deviations +.083, +.033, -.037, -.157, +.103, -.027, squares
    # summing to 0.045333, / 5 = 0.0090667 -> case sd 0.0952. A = B + d (0.90, 0.80, 0.70, 0.60, 0.85,
    # 0.75): mean 0.766667, deviations +.133, +.033, -.067, -.167, +.083, -.017, squares summing to
    # 0.058333, / 5 = 0.011667 -> case sd 0.1080.
    # d: mean 0.30 / 6 = +0.05, median (0.04 + 0.05) / 2 = +0.045; all six positive, no ties:
    # exact two-sided p = 2 / 2**6 = 0.03125; the interval lies within [min d, max d] = [0.02, 0.10].
    assert "dice_heart: 6 cases of the val split, A - B" in out
    lines = out.splitlines()
    assert lines[2].split() == ["A", str(a), "0.7667", "0.1080", "-", "1"]
    assert lines[3].split() == ["B", str(b), "0.7167", "0.0952", "-", "1"]
    assert "+0.0500   95 % CI [+0.0" in out and "median +0.0450" in out
    assert "Wilcoxon signed-rank p = 0.03125 (exact; 6 non-zero differences)" in out
    assert "verdict: better (A is better than B; higher dice_heart is better; two-sided, alpha 0.05)" in out
    doc = json.loads(out_json.read_text())
    assert doc["metric"] == "dice_heart" and doc["split"] == "val" and doc["verdict"] == "better"
    assert doc["mean_difference"] == pytest.approx(0.05) and doc["p_value"] == pytest.approx(0.03125)
    assert 0.02 <= doc["ci"][0] < 0.05 < doc["ci"][1] <= 0.10
    assert (
        doc["a"]["ref"] == str(a)
        and doc["a"]["study"] == "xray"
        and doc["b"]["mean"] == pytest.approx(4.3 / 6)
    )
    # the other way round: the same figures with the sign turned, and B is the better one
    code, out, _ = _compare(capsys, b, a, "--metric", "dice_heart")
    assert code == 0 and "-0.0500" in out and "verdict: worse (A is worse than B" in out
    # the study's headline by default (xray: dice), and a distance read the other way
    code, out, _ = _compare(capsys, a, b)
    assert code == 0 and out.startswith("dice: 6 cases")
    code, out, _ = _compare(capsys, a, b, "--metric", "dice", "--direction", "lower")
    assert "verdict: worse (A is worse than B; lower dice is better" in out


def test_seed_folders_are_averaged_per_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # seeds 0 and 1 of A are A + 0.01 and A - 0.01 on every case: their per-case mean is A itself,
    # so the paired figures and case sd are those above; seed means differ by 0.02 -> seed sd
    # sqrt(2 * 0.01**2 / 1) = 0.0141
    _run_folder(tmp_path / "a" / "seed0", {c: v + 0.01 for c, v in A.items()})
    _run_folder(tmp_path / "a" / "seed1", {c: v - 0.01 for c, v in A.items()})
    b = _run_folder(tmp_path / "b", B)
    code, out, err = _compare(capsys, tmp_path / "a", b, "--metric", "dice_heart")
    assert code == 0, err
    line_a = next(line for line in out.splitlines() if line.startswith("A "))
    assert line_a.split()[-4:] == ["0.7667", "0.1080", "0.0141", "2"]
    assert "+0.0500" in out and "p = 0.03125" in out


def test_refusals_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _run_folder(tmp_path / "a", A)
    b = _run_folder(tmp_path / "b", B)
    other = _run_folder(tmp_path / "other", {**B, "c7": 0.5})
    on_test = _run_folder(tmp_path / "on_test", B, split="test")
    unrecorded = _run_folder(tmp_path / "unrecorded", B, split=None)
    two = _run_folder(tmp_path / "two", {"c1": 0.8, "c2": math.nan})
    two_b = _run_folder(tmp_path / "two_b", {"c1": 0.7, "c2": 0.6})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    text = _run_folder(tmp_path / "text", B)
    doc = json.loads((text / "metrics.json").read_text())
    doc["cases"]["c3"]["dice_heart"] = "high"
    (text / "metrics.json").write_text(json.dumps(doc))
    cases = {
        "different cases": ([a, other], "the runs were scored on different cases: 0 only in"),
        "metric missing": (
            [a, b, "--metric", "hd95"],
            "no per-case 'hd95'; its cases have: dice, dice_heart",
        ),
        "pooled only": ([a, b, "--metric", "pooled_recall"], "only a pooled figure in 'mean'"),
        "no such folder": ([tmp_path / "nowhere", b], "no such run folder"),
        "no metrics.json": ([tmp_path / "empty", b], "no metrics.json in it or its sub-folders"),
        "not JSON": ([tmp_path / "broken", b], "metrics.json: not JSON"),
        "other split asked": ([a, b, "--split", "test"], "scored on the val split, not test"),
        "split unknown": ([unrecorded, b, "--split", "val"], "cannot tell which split"),
        "splits differ": ([on_test, b], "is scored on the test split"),
        "not a number": ([text, b, "--metric", "dice_heart"], "a per-case value 'high' is not a number"),
        "one case with values": ([two, two_b, "--metric", "dice"], "1 case(s) scored with a value by both"),
    }
    for name, (args, message) in cases.items():
        code, out, err = _compare(capsys, *args)
        assert code == 2, name
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (name, err)
        assert out == "", name


def _mlflow_run(
    client, experiment_id: str, name: str, folder: Path, tags: dict[str, str] | None = None
) -> str:
    """An MLflow run holding a run folder's files as artifacts, as evaluate logs them."""
    run_id = client.create_run(experiment_id, run_name=name, tags=tags or {}).info.run_id
    for path in sorted(folder.iterdir()):
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_mlflow_runs_by_id_and_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg_monai.tracking import ensure_experiment, open_client

    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    client = open_client()
    xray = ensure_experiment("xray", client)
    id_a = _mlflow_run(client, xray, "cpu_real seed0 (quick)", _run_folder(tmp_path / "a", A))
    _mlflow_run(client, xray, "baseline seed0 (quick)", _run_folder(tmp_path / "b", B))
    capsys.readouterr()  # MLflow's lines about creating the store
    code, out, err = _compare(
        capsys, id_a, "baseline seed0 (quick)", "--metric", "dice_heart", "--split", "val"
    )
    assert code == 0 and err == "", err  # no MLflow download bars around the table
    assert "6 cases of the val split" in out and "+0.0500" in out and "p = 0.03125" in out
    assert f"A  {id_a}" in out
    # the study's headline comes from the run's experiment (xray: dice); a folder against a run
    code, out, err = _compare(capsys, tmp_path / "a", "baseline seed0 (quick)")
    assert code == 0 and out.startswith("dice: 6 cases"), err
    _mlflow_run(client, xray, "baseline seed0 (quick)", tmp_path / "b")  # a rerun under the same name
    no_metrics = client.create_run(xray, run_name="training only").info.run_id
    for args, message in {
        (id_a, "baseline seed0 (quick)"): "names 2 MLflow runs",
        (
            id_a,
            "no such run",
        ): "'no such run' is neither a run folder nor an MLflow run id or run name in sqlite:",
        (id_a, no_metrics): f"MLflow run {no_metrics} has no metrics.json artifact: evaluate it first",
    }.items():
        code, out, err = _compare(capsys, *args)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_headline_metric_from_the_bundles() -> None:
    # the first of each bundle's headline_metrics: a list (brats, wmh, xray) or an expression (knee, lv)
    assert {s: headline_metric(s) for s in ("brats", "knee", "lv", "wmh", "xray")} == {
        "brats": "dice",
        "knee": "dice",
        "lv": "iou",
        "wmh": "dice",
        "xray": "dice",
    }
    assert (
        headline_metric("nope") is None and headline_metric("../x") is None and headline_metric(None) is None
    )


def test_report_table_against_the_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg_monai.report import build_report
    from medseg_monai.tracking import ensure_experiment, open_client

    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    client = open_client()
    xray = ensure_experiment("xray", client)

    def grid_run(
        variant: str, seed: int, heart: dict[str, float], split: str = "val", study: str = xray
    ) -> None:
        tags = {
            "reproduce.status": "complete",
            "reproduce.profile": "quick",
            "reproduce.split": split,
            "dataset.id": "xray-synthetic",
            "dataset.kind": "synthetic",
            "variant": variant,
            "seed": str(seed),
        }
        folder = _run_folder(tmp_path / study / f"{variant}{seed}", heart, split)
        if study != xray:
            (folder / "metrics.json").unlink()  # trained, never evaluated
        _mlflow_run(client, study, f"{variant} seed{seed} (quick)", folder, tags)

    # baseline: seeds 0 and 1 at B -/+ 0.01 (per-case mean B, seed means 0.7067 and 0.7267: sd 0.0141)
    grid_run("baseline", 0, {c: v - 0.01 for c, v in B.items()})
    grid_run("baseline", 1, {c: v + 0.01 for c, v in B.items()})
    grid_run("cpu_real", 0, A)  # + d: p = 2/64 alone
    grid_run("worse", 0, {c: B[c] - D[c] for c in B})  # - d: p = 2/64 alone
    grid_run("on_test", 0, A, split="test")
    knee = ensure_experiment("knee", client)
    grid_run("baseline", 0, B, study=knee)
    grid_run("merged", 0, A, study=knee)
    report = build_report(tmp_path / "reports").read_text()
    # Holm over the two comparisons: both p = 0.03125 -> 2 x 0.03125 = 0.0625 >= 0.05: no verdict
    assert "Against the baseline, case by case: dice, experiment - baseline (higher is better)" in report
    assert "| cpu_real | 6 | 1 / 2 | +0.0500 [+0.0" in report
    assert "| 0.0312 | 0.0625 | no detectable difference | - / 0.0141 |" in report
    assert "| worse | 6 | 1 / 2 | -0.0500 [-0.0" in report
    assert (
        "| on_test | - | - | - | - | - | not compared: scored on the test split, the baseline on val | - |"
        in report
    )
    html = (tmp_path / "reports" / "report.html").read_text()
    assert "<td>no detectable difference</td>" in html
    knee_part = report.split("## knee (quick profile)")[1].split("## xray")[0]
    assert "No paired statistics: baseline: MLflow run " in knee_part and "has no metrics.json" in knee_part


def test_command_line(tmp_path: Path) -> None:
    a = _run_folder(tmp_path / "a", A)
    b = _run_folder(tmp_path / "b", B)
    done = subprocess.run(
        [sys.executable, "-m", "medseg_monai.compare", str(a), str(b), "--metric", "dice_heart"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "verdict: better" in done.stdout, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "medseg_monai.compare", str(a), str(tmp_path / "c")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'c'}: no such run folder"
    ]
