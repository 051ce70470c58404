"""The BraTS bundle: its loss against the slides' formula, its label conventions on the real
samples, training on synthetic brains, and inference in the input's geometry and labels."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from bundle_utils import (
    error_lines,
    flipped_crop,
    metric_values,
    mlflow_client,
    parse_study,
    run_bundle,
    train_quick,
)
from medseg_monai.data import DatasetError, load_splits
from medseg_monai.data.inputs import channel_cases
from medseg_monai.errors import is_input_error
from medseg_monai.losses import RegionDiceLoss


def _probabilities_as_logits(p: list[list[float]]) -> torch.Tensor:
    """(C, N) class probabilities -> (1, C, N, 1, 1) logits whose softmax gives them back."""
    return torch.tensor(p).log().reshape(1, len(p), -1, 1, 1)


def test_jaccard_loss_is_the_slides_formula() -> None:
    """1 - mean over classes of |PT| / (|P|^2 + |T|^2 - |PT|), by hand on 4 voxels."""
    loss = parse_study("brats").get_parsed_content("loss")
    logits = _probabilities_as_logits([[0.1, 0.8, 0.4, 0.9], [0.9, 0.2, 0.6, 0.1]])
    target = torch.tensor([1, 0, 1, 0]).reshape(1, 1, 4, 1, 1)
    # background: PT 1.7, |P|^2 1.62, |T|^2 2 -> 1.7 / 1.92; tumour: 1.5, 1.22, 2 -> 1.5 / 1.72
    expected = 1 - (1.7 / 1.92 + 1.5 / 1.72) / 2
    assert float(loss(logits, target)) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(0.121245, abs=1e-6)


def test_jaccard_loss_of_an_absent_class_is_maximal_even_with_few_false_positives() -> None:
    # the slides' limitation: no reference voxel of a class -> its term is 1 whatever is predicted
    loss = parse_study("brats").get_parsed_content("loss")
    target = torch.tensor([1, 0, 1, 0]).reshape(1, 1, 4, 1, 1)
    for absent in (0.01, 0.1):
        p = [
            [0.1 - absent / 2, 0.8 - absent / 2, 0.4 - absent / 2, 0.9 - absent / 2],
            [0.9 - absent / 2, 0.2 - absent / 2, 0.6 - absent / 2, 0.1 - absent / 2],
            [absent] * 4,
        ]
        value = float(loss(_probabilities_as_logits(p), target))
        pt = np.array(p)
        t = np.array([[0, 1, 0, 1], [1, 0, 1, 0]])
        jacc = [
            (pt[c] * t[c]).sum() / ((pt[c] ** 2).sum() + t[c].sum() - (pt[c] * t[c]).sum()) for c in (0, 1)
        ]
        assert value == pytest.approx(1 - (jacc[0] + jacc[1] + 0.0) / 3, abs=1e-5)


def test_cross_entropy_ablation_is_plain_cross_entropy() -> None:
    loss = parse_study("brats", "cross_entropy").get_parsed_content("loss")
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6, 5, 4), torch.randint(0, 4, (2, 1, 6, 5, 4))
    assert float(loss(logits, target)) == pytest.approx(
        float(F.cross_entropy(logits, target[:, 0])), abs=1e-5
    )


def test_experiments_set_what_they_name() -> None:
    assert parse_study("brats").get_parsed_content("network_def").maps.__len__() == 3
    assert len(parse_study("brats", "single_scale").get_parsed_content("network_def").maps) == 1
    assert parse_study("brats", "sum_skips").get_parsed_content("network_def").ups[0].skip == "sum"
    assert parse_study("brats", "no_long_skips").get_parsed_content("network_def").ups[0].skip == "none"
    flair_t1c = parse_study("brats", "flair_t1c")
    assert flair_t1c.get_parsed_content("channels") == ["flair", "t1c"]
    assert flair_t1c.get_parsed_content("network_def").stem[0].in_channels == 2


def test_cpu_real_loss_and_cleanup_act_on_the_tumour_as_a_whole() -> None:
    """The recipe's loss is class Dice-CE plus the regions' Dice; its cleanup keeps the largest
    component of all tumour classes together (a core inside its edema stays, a far blob goes)."""
    parser = parse_study("brats", "cpu_real")
    parser.update({"dataset": "brats-synthetic"})
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6, 5, 4), torch.randint(0, 4, (2, 1, 6, 5, 4))
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    regions = RegionDiceLoss([[1, 2, 3], [1, 3], [3]])
    expected = float(dice_ce(logits, target) + regions(logits, target))
    assert float(parser.get_parsed_content("loss")(logits, target)) == pytest.approx(expected, abs=1e-6)

    label = torch.zeros(1, 12, 12, 12)
    label[0, 1:7, 1:7, 1:7] = 2  # edema
    label[0, 3:5, 3:5, 3:5] = 3  # an enhancing core inside it: a different class, the same lesion
    label[0, 9:11, 9:11, 9:11] = 3  # a separate small blob
    cleaned = parser.get_parsed_content("label_cleanup")({"pred": label.clone()})["pred"]
    expected_label = label.clone()
    expected_label[0, 9:11, 9:11, 9:11] = 0
    assert torch.equal(torch.as_tensor(cleaned), expected_label)
    # the paper's default keeps every prediction
    assert torch.equal(
        torch.as_tensor(parse_study("brats").get_parsed_content("label_cleanup")({"pred": label})["pred"]),
        label,
    )


@pytest.mark.parametrize(
    ("dataset", "channels", "classes", "regions"),
    [
        ("brats2018", 4, {0, 1, 2, 3}, [[1, 2, 3], [1, 3], [3]]),
        ("brats2015-4class", 2, {0, 1, 2, 3, 4}, [[1, 2, 3, 4], [1, 3, 4], [4]]),
    ],
)
def test_real_samples_load_with_their_label_convention(
    shared_data: Path, dataset: str, channels: int, classes: set[int], regions: list[list[int]]
) -> None:
    parser = parse_study("brats", profile="quick", dataset=dataset, data_root=str(shared_data / dataset))
    assert parser.get_parsed_content("region_classes") == regions
    case = parser.get_parsed_content("val_datalist")[0]
    item = parser.get_parsed_content("val_transform")(case)
    image, label = item["image"], item["label"]
    assert image.shape[0] == channels and label.shape[1:] == (240, 240, 155)  # label on the file's grid
    assert set(torch.unique(label).int().tolist()) <= classes and label.max() > 0
    brain = image[0] != 0
    assert 0.05 < float(brain.float().mean()) < 0.9  # background 0 (BRATS 2015 files: -3.6 before)
    assert abs(float(image[0][brain].mean())) < 0.05 and abs(float(image[0][brain].std()) - 1) < 0.05


# --- the bundle end to end (quick profile) ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_quick("brats", tmp_path_factory)


@pytest.mark.slow
def test_quick_profile_trains_and_improves(trained: tuple[Path, Path]) -> None:
    out, store = trained
    client = mlflow_client(store)
    run = client.search_runs([client.get_experiment_by_name("brats").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["dataset.kind"] == "synthetic"
    dice = metric_values(client, run.info.run_id, "val_dice")
    assert len(dice) == 12 and max(dice[-3:]) > dice[0] + 0.3, dice
    assert {"val_dice_wt", "val_dice_tc", "val_dice_et", "val_hd95_wt"} <= set(run.data.metrics)


@pytest.mark.slow
def test_inference_writes_the_dataset_labels_in_the_input_geometry(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """A case resampled to another grid and orientation (1.5 mm, LAS, cropped) comes back in its
    own geometry with BraTS 2018 label values."""
    out, store = trained
    case = load_splits("brats-synthetic")["test"][0]
    files = [tmp_path / "case" / Path(path).name for path in case["image"] + [case["label"]]]
    for path, target in zip(case["image"] + [case["label"]], files, strict=True):
        flipped_crop(path, target, slice(4, -4), slice(2, None))  # another affine and shape
    result = run_bundle(
        "brats",
        store,
        mode="inference",
        ckpt_path=out / "model.pt",
        output_dir=tmp_path / "pred",
        input_path=",".join(str(f) for f in files[:4]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pred = nib.load(next((tmp_path / "pred").glob("*_seg.nii.gz")))
    ref = nib.load(files[4])
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    p, r = np.asarray(pred.dataobj), np.asarray(ref.dataobj)
    assert set(np.unique(p)) <= {0, 1, 2, 4}
    wt = 2 * ((p > 0) & (r > 0)).sum() / ((p > 0).sum() + (r > 0).sum())
    assert wt > 0.5, wt


def _case_folder(tmp_path: Path) -> Path:
    case = load_splits("brats-synthetic")["test"][0]
    folder = tmp_path / "Brats18_X_1"
    folder.mkdir()
    for path in case["image"]:
        (folder / Path(path).name.replace(case["case_id"], "Brats18_X_1")).symlink_to(path)
    return folder


def test_inference_inputs_case_folders_and_files(tmp_path: Path) -> None:
    folder = _case_folder(tmp_path)
    channels = ["flair", "t1", "t1c", "t2"]
    one = channel_cases(str(folder), "brats2018", channels)
    assert len(one) == 1 and [Path(p).name for p in one[0]["image"]] == [
        f"Brats18_X_1_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")
    ]
    assert channel_cases(str(tmp_path), "brats2018", channels) == one  # a folder of case folders
    files = ",".join(one[0]["image"])
    assert channel_cases(files, "brats2018", channels)[0]["image"] == one[0]["image"]
    (folder / "Brats18_X_1_t2.nii.gz").unlink()
    with pytest.raises(
        DatasetError,
        match=r"case folder .*Brats18_X_1: no file for channel 't2' \(a name ending '_t2.nii.gz'\)",
    ):
        channel_cases(str(folder), "brats2018", channels)
    with pytest.raises(DatasetError, match="one case needs 4 files"):
        channel_cases(",".join(one[0]["image"][:2]), "brats2018", channels)


@pytest.mark.parametrize("fault", ["shape", "affine", "nan", "zero"])
def test_bad_modality_stops_with_one_line_naming_case_and_file(fault: str, tmp_path: Path) -> None:
    folder = _case_folder(tmp_path)
    t1 = folder / "Brats18_X_1_t1.nii.gz"
    img = nib.load(t1)
    data, affine = np.asarray(img.dataobj).astype(np.float32), img.affine.copy()
    if fault == "shape":
        data = data[:, :, :-1]
    elif fault == "affine":
        affine[0, 3] += 5
    elif fault == "nan":
        data[10, 10, 10] = np.nan
    else:
        data[:] = 0
    t1.unlink()
    nib.save(nib.Nifti1Image(data, affine), t1)
    preprocess = parse_study("brats", profile="quick").get_parsed_content("infer_preprocessing")
    expected = {
        "shape": r"has shape \(96, 96, 63\) but .*_flair.nii.gz has \(96, 96, 64\)",
        "affine": "the affine of .*_t1.nii.gz differs from that of .*_flair.nii.gz",
        "nan": "_t1.nii.gz has 1 NaN or infinite voxels",
        "zero": "_t1.nii.gz is all zero",
    }[fault]
    with pytest.raises(Exception) as caught:  # noqa: PT011 (MONAI wraps it: the cause is the message)
        preprocess(channel_cases(str(folder), "brats2018", ["flair", "t1", "t1c", "t2"])[0])
    message = str(is_input_error(caught.value))
    assert re.search(expected, message) and "case 'Brats18_X_1'" in message, message


@pytest.mark.slow
def test_missing_modality_at_inference_is_one_error_line(tmp_path: Path) -> None:
    folder = _case_folder(tmp_path)
    (folder / "Brats18_X_1_t1ce.nii.gz").unlink()
    ckpt = tmp_path / "model.pt"
    torch.save(parse_study("brats", profile="quick").get_parsed_content("network_def").state_dict(), ckpt)
    result = run_bundle(
        "brats",
        tmp_path / "mlflow",
        mode="inference",
        ckpt_path=ckpt,
        input_path=folder,
        output_dir=tmp_path / "o",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and "no file for channel 't1c'" in lines[0], result.stderr[-2000:]
