"""Loading, checking and saving transforms: a truncated NIfTI, a 4D one where a volume is expected,
a case whose files disagree in shape or position, and a channel with NaN or nothing in it stop with
one line naming the case and the file; predictions are saved as label PNGs and overlays."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from medseg_monai.data import DatasetError
from medseg_monai.transforms import (
    CheckFilesd,
    CheckGeometryd,
    CheckIntensityd,
    SaveLabelPNGd,
    SaveVolumeOverlayd,
)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_one_line_naming_case_and_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"flair{suffix}"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)), path
    )
    CheckFilesd("image")({"image": str(path), "case_id": "A1"})  # whole: passes
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])  # the header survives, the voxels do not
    with pytest.raises(
        DatasetError, match=rf"^case 'A1': {path}: (truncated|cannot read this file \(EOFError)"
    ):
        CheckFilesd("image")({"image": str(path), "case_id": "A1"})


def test_a_4d_nifti_where_a_volume_is_expected_is_one_line(tmp_path: Path) -> None:
    cine, frame = tmp_path / "cine.nii.gz", tmp_path / "frame.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 3), np.float32), np.eye(4)), cine)
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 1), np.float32), np.eye(4)), frame)  # a trailing 1 is 3D
    CheckFilesd("image", spatial_dims=3)({"image": str(frame), "case_id": "A1"})
    CheckFilesd("image")({"image": str(cine), "case_id": "A1"})  # no dimension asked for: any
    with pytest.raises(
        DatasetError,
        match=rf"^case 'A1': {cine}: a 4D image \(6 x 5 x 4 x 3\) where one 3D volume is expected \(a cine",
    ):
        CheckFilesd("image", spatial_dims=3)({"image": str(cine), "case_id": "A1"})
    flat = tmp_path / "slice.nii.gz"  # one slice where the volume is expected: not called a cine
    nib.save(nib.Nifti1Image(np.ones((6, 5), np.float32), np.eye(4)), flat)
    with pytest.raises(
        DatasetError, match=r"a 2D image \(6 x 5\) where one 3D volume is expected \(a slice\)$"
    ):
        CheckFilesd("image", spatial_dims=3)({"image": str(flat), "case_id": "A1"})


def _nifti(path: Path, shape: tuple[int, ...], affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4) if affine is None else affine), path)
    return str(path)


def test_a_case_whose_files_disagree_in_shape_or_position_is_one_line(tmp_path: Path) -> None:
    flair = _nifti(tmp_path / "flair.nii.gz", (4, 4, 4))
    t1 = _nifti(tmp_path / "t1.nii.gz", (4, 4, 4))
    short = _nifti(tmp_path / "short.nii.gz", (4, 4, 3))
    moved = _nifti(tmp_path / "moved.nii.gz", (4, 4, 4), np.diag([1.0, 1.0, 1.01, 1.0]))
    check = CheckGeometryd(["image", "label"])
    check({"image": [flair, t1], "label": t1, "case_id": "c1"})  # one grid: passes
    with pytest.raises(
        DatasetError, match=rf"^case 'c1': {short} has shape \(4, 4, 3\) but {flair} has \(4, 4, 4\)$"
    ):
        check({"image": [flair, t1], "label": short, "case_id": "c1"})
    with pytest.raises(
        DatasetError, match=rf"^case 'c1': the affine of {moved} differs from that of {flair}$"
    ):
        check({"image": [flair, moved], "label": t1, "case_id": "c1"})


def test_a_channel_with_nan_or_nothing_in_it_is_one_line_naming_its_file() -> None:
    image = torch.ones(2, 3, 3, 3)
    check = CheckIntensityd("image", channel_keys=["flair", "t1"])
    case = {"image": image, "flair": "a/flair.nii.gz", "t1": "a/t1.nii.gz", "case_id": "c1"}
    assert check(case)["image"] is image
    image[1] = 0
    with pytest.raises(DatasetError, match=r"^case 'c1': a/t1.nii.gz is all zero$"):
        check(case)
    image[0, 1, 1, 1] = float("nan")
    with pytest.raises(DatasetError, match=r"^case 'c1': a/flair.nii.gz has 1 NaN or infinite voxels$"):
        check(case)


def test_save_label_png_writes_class_indices_and_an_overlay_upright(tmp_path: Path) -> None:
    """A (3, H=4, W=5) one-hot prediction of MONAI's (x, y) arrays: the PNG holds the class index of
    each pixel, transposed back to the stored (rows = y) layout, and the overlay has its size."""
    classes = torch.zeros(4, 5, dtype=torch.long)
    classes[1, 2], classes[3, 0:2] = 1, 2
    pred = torch.nn.functional.one_hot(classes, 3).permute(2, 0, 1).float()
    image = torch.linspace(0, 1, 20).reshape(1, 4, 5)
    SaveLabelPNGd("pred", output_dir=str(tmp_path / "out"))({"pred": pred, "image": image, "case_id": "JPC1"})
    label = np.asarray(Image.open(tmp_path / "out" / "JPC1_label.png"))
    assert label.dtype == np.uint8 and label.shape == (5, 4)
    assert np.array_equal(label, classes.numpy().T)
    overlay = np.asarray(Image.open(tmp_path / "out" / "JPC1_overlay.png"))
    assert overlay.shape == (5, 4, 3)
    coloured = overlay[..., 0] != overlay[..., 1]  # grey where background: R = G = B
    assert np.array_equal(coloured, classes.numpy().T > 0)


def test_save_volume_overlay_shows_the_slices_with_foreground_named_after_the_image(tmp_path: Path) -> None:
    image = MetaTensor(torch.rand(1, 6, 7, 5), meta={"filename_or_obj": "/data/flair_01.nii.gz"})
    mask = torch.zeros(1, 6, 7, 5)
    mask[0, 1:3, 2:5, 1] = 1  # 6 voxels in slice 1
    mask[0, 4, 0:2, 3] = 1  # 2 in slice 3; slices 0, 2, 4 empty
    SaveVolumeOverlayd("pred", image_key="image", output_dir=str(tmp_path))({"pred": mask, "image": image})
    overlay = np.asarray(Image.open(tmp_path / "flair_01_overlay.png"))
    assert overlay.shape == (7, 2 * 6, 3)  # two slices with foreground, each (Y, X) upright
    coloured = overlay[..., 0] != overlay[..., 1]
    assert coloured[:, :6].sum() == 6 and coloured[:, 6:].sum() == 2
