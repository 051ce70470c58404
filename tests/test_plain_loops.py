"""The plain PyTorch loops the docs compare the real-data recipes with (``bundles/<study>/docs/
plain_loop.py``) run on the real samples and score the cases they leave out."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from bundle_utils import ROOT
from medseg_monai.data.datalist import load_datalist


def _run(study: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> dict:
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", *args])
    runpy.run_path(str(ROOT / "bundles" / study / "docs" / "plain_loop.py"), run_name="__main__")
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_wmh_plain_loop_refuses_an_unknown_held_out_case(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sys, "argv", ["x", "--data_root", str(shared_data / "wmh-clinical-flair"), "--held_out", "nope"]
    )
    with pytest.raises(SystemExit, match="--held_out nope is not a case folder"):
        runpy.run_path(str(ROOT / "bundles" / "wmh" / "docs" / "plain_loop.py"), run_name="__main__")


@pytest.mark.slow
def test_wmh_plain_loop_scores_the_volume_it_left_out(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = shared_data / "wmh-clinical-flair"
    result = _run(
        "wmh", ["--data_root", str(root), "--held_out", "2516043217", "--steps", "1"], monkeypatch, capsys
    )
    assert result["held_out"] == "2516043217"
    assert result["trained_on"] == ["2516038876", "2516041494"]
    assert 0.0 <= result["dice"] <= 1.0 and 0.0 <= result["recall"] <= 1.0


@pytest.mark.parametrize(
    ("study", "dataset", "n_folds"), [("xray", "jsrt-scr", 5), ("lv", "acdc", 4), ("brats", "brats2018", 3)]
)
def test_plain_loop_refuses_a_fold_out_of_range(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch, study: str, dataset: str, n_folds: int
) -> None:
    args = ["x", "--data_root", str(shared_data / dataset), "--fold", str(n_folds), "--n_folds", str(n_folds)]
    monkeypatch.setattr(sys, "argv", args)
    last = n_folds - 1
    with pytest.raises(
        SystemExit,
        match=rf"^error: fold must be a whole number from 0 to {last} \(n_folds {n_folds}\), got {n_folds}$",
    ):
        runpy.run_path(str(ROOT / "bundles" / study / "docs" / "plain_loop.py"), run_name="__main__")


@pytest.mark.slow
def test_xray_plain_loop_scores_the_validation_images_of_its_fold(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = shared_data / "jsrt-scr"
    args = ["--data_root", str(root), "--epochs", "1", "--fold", "1", "--n_folds", "5"]
    result = _run("xray", args, monkeypatch, capsys)
    fold_val = {it["case_id"] for it in load_datalist("jsrt-scr", root, "val", fold=1, n_folds=5)}
    assert set(result["per_image"]) == fold_val  # the fold's 8, not the registry's val split
    assert fold_val != {it["case_id"] for it in load_datalist("jsrt-scr", root, "val")}
    assert set(result["val_dice"]) == {"lungs", "heart"}
    assert all(set(v) == {"lungs", "heart"} for v in result["per_image"].values())
    assert all(0.0 <= d <= 1.0 for v in result["per_image"].values() for d in v.values())


@pytest.mark.slow
def test_lv_plain_loop_scores_every_frame_of_its_fold(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = shared_data / "acdc"
    result = _run("lv", ["--data_root", str(root), "--minutes", "0.05", "--fold", "2"], monkeypatch, capsys)
    held = {it["case_id"] for it in load_datalist("acdc", root, "val", fold=2, n_folds=4, fold_pool="all")}
    assert set(result["per_frame"]) == held and len(held) == 10  # the fold's 5 patients, ED and ES
    assert result["steps"] >= 1 and set(result["val_dice"]) == {"rv_cavity", "myocardium", "lv_cavity"}
    assert all(0.0 <= d <= 1.0 for v in result["per_frame"].values() for d in v.values())
