"""Loading and checking transforms: a truncated NIfTI and a 4D one where a volume is expected stop
with one line naming the case and the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg_monai.data import DatasetError
from medseg_monai.transforms import CheckFilesd


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_one_line_naming_case_and_file(tmp_path: Path, suffix: str) -> None:
    import nibabel as nib

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
    import nibabel as nib

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
