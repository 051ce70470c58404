"""The LV bundle on real short-axis cine MR (the ACDC samples in ``../shared/data/acdc``): phases
and patient-grouped folds from the registry, the real-data recipe trained, evaluated with the
cardiac figures (per-class Dice, IoU and 95 % Hausdorff distance in voxels, by phase, the whole-LV
IoU, ejection fractions per patient) and applied to frames of other sizes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle_utils import error_lines, parse_study, run_bundle
from medseg_monai.data import DatasetError, load_datalist, load_splits


def test_acdc_frames_carry_their_phase(shared_data: Path) -> None:
    items = load_datalist("acdc", shared_data / "acdc", split="all")
    assert len(items) == 40
    by_patient: dict[str, dict[str, str]] = {}
    for it in items:
        by_patient.setdefault(it["group"], {})[it["phase"]] = it["case_id"]
    assert len(by_patient) == 20 and all(set(p) == {"ED", "ES"} for p in by_patient.values())
    assert by_patient["patient001"] == {"ED": "patient001_frame01", "ES": "patient001_frame12"}
    # end-diastole is the fuller LV: the reference cavity is larger at ED in every shared patient
    for frames in by_patient.values():
        ed, es = (next(i for i in items if i["case_id"] == frames[p]) for p in ("ED", "ES"))
        volumes = [int((np.asarray(nib.load(f["label"]).dataobj) == 3).sum()) for f in (ed, es)]
        assert volumes[0] > volumes[1], frames


def test_a_patient_missing_a_frame_is_refused_in_one_line(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "acdc"
    for patient in ("patient001", "patient006"):
        shutil.copytree(shared_data / "acdc" / patient, root / patient)
    for f in (root / "patient006").glob("patient006_frame16*"):
        f.unlink()
    with pytest.raises(
        DatasetError,
        match=r"patient 'patient006' .* has 1 case\(s\) \(patient006_frame01\); each needs one per phase \(ED, ES\)",
    ):
        load_datalist("acdc", root, split="all")


def test_folds_over_every_case_score_each_patient_once(shared_data: Path) -> None:
    root = shared_data / "acdc"
    folds = [load_splits("acdc", root, fold=k, n_folds=4, fold_pool="all") for k in range(4)]
    held = [{it["group"] for it in f["val"]} for f in folds]
    assert all(len(h) == 5 for h in held) and set().union(*held) == {
        it["group"] for it in load_datalist("acdc", root, split="all")
    }
    for f, h in zip(folds, held, strict=True):
        assert not f["test"] and not h & {it["group"] for it in f["train"]} and len(f["train"]) == 30
    # the default pool leaves the test part out of the folds, as before
    plain = load_splits("acdc", root, fold=0, n_folds=4)
    assert (
        plain["test"] == load_splits("acdc", root)["test"] and len(plain["train"]) + len(plain["val"]) == 34
    )
    with pytest.raises(DatasetError, match="fold_pool must be one of train_val, all, got 'every'"):
        load_splits("acdc", root, fold=0, n_folds=4, fold_pool="every")


@pytest.mark.parametrize("profile", [None, "quick"])
def test_recipe_trains_on_slices_of_every_size(shared_data: Path, profile: str | None) -> None:
    fold = {"fold": 0, "n_folds": 4, "fold_pool": "all", "train_split": "train"}
    small = {"train_datalist": "$@datalist['train'][:2]"} if profile else {}
    parser = parse_study(
        "lv", "cpu_real", profile, dataset="acdc", data_root=str(shared_data / "acdc"), **fold, **small
    )
    assert parser.get_parsed_content("class_names") == ["background", "rv_cavity", "myocardium", "lv_cavity"]
    # 8 slices of each frame, whatever its size (154-256 px, 6-18 slices); the quick profile's
    # blocks of the paper's network do not reach the recipe's slices
    slices = parser.get_parsed_content("train_dataset")[0]
    assert len(slices) == 8 and all(s["image"].shape == (1, 128, 128) for s in slices)
    if not profile:
        assert len(parser.get_parsed_content("train_datalist")) == 30


@pytest.mark.slow
def test_recipe_evaluates_and_infers_real_frames(shared_data: Path, tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    fold = {"dataset": "acdc", "data_root": shared_data / "acdc", "fold": 0, "n_folds": 4, "fold_pool": "all"}
    result = run_bundle(
        "lv",
        store,
        experiment="cpu_real",
        profile=None,
        output_dir=out,
        train_split="train",
        max_epochs=2,
        val_interval=2,
        **fold,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_bundle(
        "lv",
        store,
        mode="evaluate",
        experiment="cpu_real",
        profile=None,
        output_dir=out,
        ckpt_path=out / "model_final.pt",
        split="val",
        train_split="train",
        **fold,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    held = {
        it["case_id"]
        for it in load_splits("acdc", shared_data / "acdc", fold=0, n_folds=4, fold_pool="all")["val"]
    }
    assert set(metrics["cases"]) == held and len(held) == 10
    structures = ("rv_cavity", "myocardium", "lv_cavity")
    for name in ("dice", "iou", "hd95_vox"):
        assert all(f"{name}_{s}" in metrics["mean"] for s in structures), name
    assert set(metrics["by_phase"]) == {"ED", "ES"} and "dice_lv_cavity" in metrics["by_phase"]["ES"]
    # the whole LV's IoU (the paper's one mask), per frame and over frames
    assert all(0 <= c["iou_lv"] <= 1 for c in metrics["cases"].values()) and "iou_lv" in metrics["mean"]
    patients = metrics["patients"]
    assert len(patients) == 5 and all(
        {"ef_lv", "ef_lv_ref", "ef_rv", "ef_rv_ref"} <= set(p) for p in patients.values()
    )
    with open(out / "eval_val_ejection_fraction.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient"] for r in rows) == sorted(patients)
    # each reference EF is the one the label files give, from voxel counts
    p = rows[0]
    assert float(p["ef_lv_ref"]) == pytest.approx(
        100 * (1 - float(p["esv_lv_voxels_ref"]) / float(p["edv_lv_voxels_ref"])), abs=1e-3
    )
    assert {"ef_lv_mae", "ef_lv_corr", "ef_rv_mae"} <= set(metrics["mean"])

    # inference on a 6-slice 154 x 224 frame and on a 256 x 256 one upsampled to 512 x 512: ACDC's
    # label values in the input's geometry

    def infer(inputs: Path, output: str) -> subprocess.CompletedProcess:
        return run_bundle(
            "lv",
            store,
            mode="inference",
            experiment="cpu_real",
            profile=None,
            ckpt_path=out / "model_final.pt",
            input_path=inputs,
            output_dir=tmp_path / output,
        )

    small = nib.load(shared_data / "acdc" / "patient041" / "patient041_frame01.nii.gz")
    wide = np.asarray(nib.load(shared_data / "acdc" / "patient076" / "patient076_frame01.nii.gz").dataobj)
    big, big_affine = np.kron(wide, np.ones((2, 2, 1), np.float32)), np.diag([0.5, 0.5, 1.0, 1.0])
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(small.get_filename(), inputs / "small.nii.gz")
    nib.save(nib.Nifti1Image(big, big_affine), inputs / "large.nii.gz")
    result = infer(inputs, "pred")
    assert result.returncode == 0, result.stderr[-3000:]
    assert big.shape == (512, 512, 8)
    for name, shape, affine in (("small", small.shape, small.affine), ("large", big.shape, big_affine)):
        pred = nib.load(tmp_path / "pred" / f"{name}_seg.nii.gz")
        assert pred.shape == shape and np.allclose(pred.affine, affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    # ACDC also ships each patient's whole cine series as one 4D file: refused before the engine starts
    cine = tmp_path / "cine" / "patient041_4d.nii.gz"
    cine.parent.mkdir()
    nib.save(nib.Nifti1Image(np.stack([np.asarray(small.dataobj)] * 3, -1), small.affine), cine)
    result = infer(cine, "pred4d")
    assert result.returncode != 0 and error_lines(result) == [
        f"error: case 'patient041_4d': {cine}: a 4D image (154 x 224 x 6 x 3) where one 3D volume is expected "
        "(a cine or time series: one file per frame)"
    ]
    assert "Traceback" not in result.stderr


def test_a_wrong_fold_pool_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_bundle("lv", tmp_path / "mlflow", fold=0, fold_pool="every", output_dir=tmp_path / "run")
    assert result.returncode != 0 and error_lines(result) == [
        "error: fold_pool must be one of train_val, all, got 'every'"
    ]


@pytest.mark.parametrize(("class_set", "classes"), [("lv", [1, 2]), ("default", [2, 3])])
def test_whole_lv_iou_is_the_iou_of_myocardium_and_cavity_as_one_mask(
    class_set: str, classes: list[int]
) -> None:
    """The paper's one LV mask against our two classes: iou_lv scores their union (issue #37, item 7)."""
    import torch
    from monai.metrics import compute_iou

    from medseg_monai.transforms import LabelToRegionsd

    parser = parse_study("lv", dataset="lv-synthetic", class_set=class_set)
    assert parser.get_parsed_content("region_names") == ["lv"]
    assert parser.get_parsed_content("region_classes") == [classes]
    myo, cavity = classes
    ref = torch.zeros(1, 4, 4, 1)
    ref[0, :2, :2] = cavity  # 4 cavity voxels
    ref[0, 2:, :2] = myo  # 4 myocardium voxels
    pred = ref.clone()
    pred[0, 1, :2] = myo  # 2 cavity voxels called myocardium: the classes' IoU drop, the LV's does not
    pred[0, 0, 2] = myo  # 1 voxel too many
    regions = LabelToRegionsd(["pred", "label"], parser.get_parsed_content("region_classes"))
    out = regions({"pred": pred, "label": ref})
    iou = compute_iou(out["pred"][None], out["label"][None], include_background=True)
    assert iou.item() == pytest.approx(8 / 9)  # union 9 voxels, intersection 8
