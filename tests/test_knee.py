"""The knee bundle end to end: its configuration as the thesis sets it, training on synthetic knees
(every bone learns), and a NIfTI knee of another shape and spacing in the knee-mr-bones layout that
trains, evaluates and comes back from inference in its own geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_utils import (
    error_lines,
    flipped_crop,
    metric_values,
    mlflow_client,
    parse_study,
    run_bundle,
    train_quick,
)
from medseg_monai.synthetic import knee


def test_configuration_is_the_thesis() -> None:
    parser = parse_study("knee")
    assert parser.get_parsed_content("size") == [224, 224, 36]
    net = parser.get_parsed_content("network_def")
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.2] * 5
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3
    scheduler = parser.get_parsed_content("lr_scheduler")
    for _ in range(68 * 61):  # sec. 4.5.4's 68 epochs of ~61 training volumes (80 % of 76 maps)
        optimizer.step()
        scheduler.step()
    lr = optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 / (1 + 4.148)) and round(lr, 6) == 1.94e-4  # not 1e-4
    for _ in range(9000 - 68 * 61):  # Keras decay 1e-3 per step: 1e-3 / (1 + 9) after 9000 steps
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert parser.get_parsed_content("patience") == 9 and parser.get_parsed_content("out_channels") == 3
    assert get_fractions() == [0.8, 0.2, 0.0]
    merged = parse_study("knee", "merged")
    assert merged.get_parsed_content("out_channels") == 1 and merged.get_parsed_content("target_classes") == [
        [1, 2, 3]
    ]
    two_d = parse_study("knee", "slices_2d", "quick").get_parsed_content("network_def")
    assert not any(isinstance(m, torch.nn.Conv3d) for m in two_d.modules())


def get_fractions() -> list[float]:
    from medseg_monai.data import get_dataset

    return list(get_dataset("knee-synthetic").split["fractions"])


def test_bad_label_mode_is_one_line() -> None:
    from medseg_monai.errors import InputError

    with pytest.raises(Exception) as caught:  # noqa: PT011 (MONAI wraps it)
        parse_study("knee", label_mode="bones").get_parsed_content("target_classes")
    from medseg_monai.errors import is_input_error

    found = is_input_error(caught.value)
    assert (
        isinstance(found, InputError)
        and str(found) == "label_mode must be one of separate, merged, got 'bones'"
    )


def test_2d_training_samples_are_the_slices_of_a_volume() -> None:
    parser = parse_study("knee", "slices_2d", "quick", cache_rate=0.0)  # one volume read, not all cached
    dataset = parser.get_parsed_content("train_dataset")
    samples = dataset[0]
    assert isinstance(samples, list) and len(samples) == 16  # the quick profile's 16 slices
    plane = tuple(parser.get_parsed_content("size")[:2])
    assert samples[0]["image"].shape == (1, *plane) and samples[0]["label"].shape == (3, *plane)


# --- training on the synthetic knees ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_quick("knee", tmp_path_factory)


@pytest.mark.slow
def test_quick_profile_learns_femur_and_tibia_and_scores_every_bone(trained: tuple[Path, Path]) -> None:
    """Femur and tibia learn in the quick profile's 120 steps; the fibula (0.4 % of a volume) first
    covers every bone-like voxel and separates from them after 12 to over 20 epochs depending on
    the seed (docs/README.md, Quick profile), so it is only checked to be trained and scored."""
    out, store = trained
    client = mlflow_client(store)
    run = client.search_runs([client.get_experiment_by_name("knee").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["dataset.kind"] == "synthetic"
    for bone in ("femur", "tibia"):
        dice = metric_values(client, run.info.run_id, f"val_dice_{bone}")
        assert max(dice[-3:]) > dice[0] + 0.25, (bone, dice)
    fibula = metric_values(client, run.info.run_id, "val_dice_fibula")
    assert len(fibula) == 6 and all(0.0 <= d <= 1.0 for d in fibula), fibula  # every second of 12 epochs
    assert {"val_iou_femur", "val_iou_fibula"} <= set(run.data.metrics)
    assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_evaluate_scores_on_the_native_grid(trained: tuple[Path, Path], tmp_path: Path) -> None:
    out, store = trained
    result = run_bundle(
        "knee", store, mode="evaluate", output_dir=out, ckpt_path=out / "model.pt", split="val"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["cases"]) == 2
    scan = ["dice", "dice_femur", "dice_tibia", "dice_fibula", "iou_femur", "iou_tibia", "iou_fibula"]
    assert set(scan) | {"window_" + m for m in scan} <= set(metrics["mean"])  # both fields of view
    assert metrics["mean"]["dice_femur"] > 0.6 and metrics["mean"]["window_dice_femur"] > 0.6, metrics["mean"]


def test_the_grid_reports_the_thesis_window_and_the_whole_scan(tmp_path: Path) -> None:
    """The report lists, for every entry, the thesis's figure (window_*) and the whole scan's."""
    from medseg_monai.reproduce import plan

    jobs = [j for j in plan("quick", studies=["knee"], runs_dir=tmp_path) if j.study == "knee"]
    for bone in ("femur", "tibia", "fibula"):
        for metric in ("dice", "iou"):
            assert all({f"window_{metric}_{bone}", f"{metric}_{bone}"} <= set(j.metrics) for j in jobs)
    assert "window_* = the thesis's scoring" in next(j.note for j in jobs if j.experiment == "baseline")


# --- a real-layout knee of another shape and spacing ------------------------------------------------


@pytest.fixture(scope="module")
def bones_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A knee-mr-bones folder of 5 synthetic knees at 120 x 120 x 24 (0.93 x 0.93 x 4.5 mm, like the
    thesis's 24-slice source) instead of the synthetic set's 160 x 160 x 36."""
    root = tmp_path_factory.mktemp("knee-mr-bones")
    knee.generate(root, seed=7, n_cases=5, shape=(120, 120, 24))
    return root


@pytest.mark.slow
def test_other_geometry_trains_evaluates_and_infers_in_its_own_geometry(
    bones_root: Path, tmp_path: Path
) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    common = {"dataset": "knee-mr-bones", "data_root": bones_root, "output_dir": out}
    result = run_bundle("knee", store, max_epochs=2, **common)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_bundle("knee", store, mode="evaluate", ckpt_path=out / "model.pt", split="val", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["cases"]
    # inference on an LPS-flipped, cropped copy with a wider window than training: sliding window
    moved = tmp_path / "in" / "knee_x.nii.gz"
    data, affine = flipped_crop(bones_root / "imagesTr" / "knee_004.nii.gz", moved, slice(3, -5), slice(None))
    result = run_bundle(
        "knee",
        store,
        mode="inference",
        ckpt_path=out / "model.pt",
        input_path=moved,
        output_dir=tmp_path / "pred",
        infer_window_mm=150.0,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pred = nib.load(tmp_path / "pred" / "knee_x_seg.nii.gz")
    assert pred.shape == data.shape and np.allclose(pred.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_missing_input_is_one_error_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save(parse_study("knee", profile="quick").get_parsed_content("network_def").state_dict(), ckpt)
    result = run_bundle(
        "knee", tmp_path / "mlflow", mode="inference", ckpt_path=ckpt, input_path=tmp_path / "nowhere.nii.gz"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1, result.stderr[-2000:]
