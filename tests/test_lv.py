"""The LV bundle: its configuration as the paper's table 1, block training and whole-volume inference
on volumes of any size (padded to a multiple of 8 and cropped back), training on synthetic hearts,
and inference in the input's geometry with ACDC label values."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_utils import flipped_crop, metric_values, mlflow_client, parse_study, run_bundle, train_quick
from medseg_monai.data import load_splits
from medseg_monai.losses import SoftIoULoss
from medseg_monai.networks import FactorizedConvUNet


def test_configuration_is_the_papers_table_1() -> None:
    parser = parse_study("lv")
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, FactorizedConvUNet)
    assert isinstance(parser.get_parsed_content("loss"), SoftIoULoss)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.out_channels == 30
    rates = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and all(r == pytest.approx(0.15) for r in rates)  # keep probability 0.85
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adam)
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.0, 3e-4} and all(
        g["lr"] == 7.6e-5 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups
    )
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert all(
        id(m.weight) in decayed and id(m.bias) not in decayed
        for m in net.modules()
        if isinstance(m, torch.nn.Conv3d)
    )
    clip = parser.get_parsed_content("train_handlers")[0]
    assert clip.max_norm == 1.0
    assert parser.get_parsed_content("class_names") == ["background", "myocardium", "lv_cavity"]
    assert parse_study("lv", "all_classes").get_parsed_content("num_classes") == 4


def test_blocks_for_training_whole_padded_volumes_for_validation() -> None:
    parser = parse_study("lv", profile="quick")
    blocks = parser.get_parsed_content("train_dataset")[0]
    assert len(blocks) == 2 and all(b["image"].shape == (1, 64, 64, 8) for b in blocks)
    case = parser.get_parsed_content("validate#dataset")[0]
    native = nib.load(parser.get_parsed_content("val_datalist")[0]["label"]).shape
    assert case["image"].shape[1:] == tuple(-(-n // 8) * 8 for n in native)  # padded up to multiples of 8
    assert case["label"].shape[1:] == native  # the metrics score on the file's grid


# --- the bundle end to end (quick profile) ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_quick("lv", tmp_path_factory)


@pytest.mark.slow
def test_quick_profile_trains_and_improves(trained: tuple[Path, Path]) -> None:
    out, store = trained
    client = mlflow_client(store)
    run = client.search_runs([client.get_experiment_by_name("lv").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["dataset.kind"] == "synthetic"
    for metric in ("val_iou_myocardium", "val_iou_lv_cavity"):
        values = metric_values(client, run.info.run_id, metric)
        assert max(values[-2:]) > values[0] + 0.2, (metric, values)


@pytest.mark.slow
def test_evaluate_on_test_and_infer_in_the_input_geometry(trained: tuple[Path, Path], tmp_path: Path) -> None:
    out, store = trained
    result = run_bundle(
        "lv", store, mode="evaluate", output_dir=out, ckpt_path=out / "model.pt", split="test"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["mean"]
    assert {"iou", "iou_myocardium", "iou_lv_cavity", "dice"} <= set(metrics)
    # a stack of another size (not a multiple of 8, 11 slices), flipped: whole-volume inference
    case = load_splits("lv-synthetic")["test"][0]
    moved = tmp_path / "in" / "heart.nii.gz"
    data, affine = flipped_crop(case["image"][0], moved, slice(5, -2), slice(None, 11))
    result = run_bundle(
        "lv",
        store,
        mode="inference",
        ckpt_path=out / "model.pt",
        input_path=moved,
        output_dir=tmp_path / "pred",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pred = nib.load(tmp_path / "pred" / "heart_seg.nii.gz")
    assert pred.shape == data.shape and np.allclose(pred.affine, affine, atol=1e-4)
    values = np.asarray(pred.dataobj)
    assert set(np.unique(values)) <= {0, 2, 3} and (values == 3).any()  # ACDC values: 2 myo, 3 LV cavity
