"""DICOM in (issue #40 item 5): a folder of one DICOM series is one inference case, read through ITK,
and its prediction is written as NIfTI on the series' grid. The series is written here from a
synthetic volume with an oblique direction, anisotropic spacing and an origin off zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bundle_utils import error_lines, parse_study, run_bundle
from medseg_monai.data import DatasetError
from medseg_monai.data.inputs import image_files

SPACING = (0.9, 1.1, 3.0)  # x, y, z in mm
ORIGIN = (-40.5, 12.25, 7.0)  # LPS, mm
ANGLE = 0.3  # rad about z: an oblique in-plane direction
DIRECTION = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def write_series(folder: Path, volume_zyx: np.ndarray, series: str = "1", study: str = "1") -> sitk.Image:
    """Write ``volume_zyx`` (int16) as a DICOM MR series, one file per slice (no suffix, as scanners
    often name them), each with its ImagePositionPatient and the series' ImageOrientationPatient;
    returns the volume as SimpleITK holds it (its geometry is what the files must say)."""
    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    root = "1.2.826.0.1.3680043.2.1125.40"
    orientation = "\\".join(f"{v:.10f}" for v in (*DIRECTION[0::3], *DIRECTION[1::3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the file names say nothing of their format
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        position = "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000d", f"{root}.{study}"),
            ("0020|000e", f"{root}.{study}.{series}"),
            ("0008|0018", f"{root}.{study}.{series}.{k + 1}"),
            ("0020|0013", str(k + 1)),
            ("0020|0032", position),
            ("0020|0037", orientation),
        ):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{series}_{k:04d}"))
        writer.Execute(piece)
    return image


def _volume(shape_zyx: tuple[int, int, int] = (12, 20, 16)) -> np.ndarray:
    rng = np.random.default_rng(40)
    return (rng.random(shape_zyx) * 800 + 100).astype(np.int16)


def _geometry(image: sitk.Image) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(v, dtype=float) for v in (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()))  # fmt: skip


def test_a_written_series_reads_back_with_its_geometry(tmp_path: Path) -> None:
    """The test's own series is what it means to be: ITK (GDCM) reads back voxels and geometry."""
    volume = _volume()
    write_series(tmp_path / "series", volume)
    from monai.transforms import LoadImage

    loaded = LoadImage(image_only=True, reader="ITKReader")(str(tmp_path / "series"))
    assert np.array_equal(np.asarray(loaded), volume.transpose(2, 1, 0))  # MONAI: x, y, z
    # MONAI's RAS affine: LPS flips x and y; columns are the axes scaled by their spacing
    rotation = np.asarray(DIRECTION).reshape(3, 3) * np.asarray(SPACING)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(loaded.affine[:3, :3].numpy(), lps_to_ras @ rotation, atol=1e-6)
    np.testing.assert_allclose(loaded.affine[:3, 3].numpy(), lps_to_ras @ np.asarray(ORIGIN), atol=1e-6)


def test_a_series_folder_is_one_inference_case(tmp_path: Path) -> None:
    write_series(tmp_path / "series", _volume())
    assert image_files(str(tmp_path / "series"), [".nii.gz"], spatial_dims=3) == [
        {"image": str(tmp_path / "series"), "case_id": "series"}
    ]


def test_a_folder_of_two_series_is_refused_in_one_line(tmp_path: Path) -> None:
    write_series(tmp_path / "mixed", _volume(), series="1")
    write_series(tmp_path / "mixed", _volume(), series="2")
    with pytest.raises(
        DatasetError, match=r"mixed: 2 DICOM series in this folder; give the folder of one series$"
    ):
        image_files(str(tmp_path / "mixed"), [".nii.gz"], spatial_dims=3)


def test_inference_on_a_dicom_series_writes_nifti_on_the_series_grid(tmp_path: Path) -> None:
    """LV's inference (quick profile, an untrained network's weights: only the geometry matters)
    on a DICOM series: the prediction's NIfTI has the series' size, spacing, origin and direction."""
    network = parse_study("lv", profile="quick").get_parsed_content("network_def")
    (tmp_path / "model").mkdir()
    torch.save(network.state_dict(), tmp_path / "model" / "model.pt")
    series = write_series(tmp_path / "patient7", _volume())
    out = tmp_path / "pred"
    result = run_bundle(
        "lv", tmp_path / "mlflow", mode="inference", input_path=tmp_path / "patient7",
        ckpt_path=tmp_path / "model" / "model.pt", output_dir=out,
    )  # fmt: skip
    assert result.returncode == 0 and not error_lines(result), result.stderr[-3000:]
    (written,) = out.glob("*.nii.gz")
    assert written.name == "patient7_seg.nii.gz"
    prediction = sitk.ReadImage(str(written))
    for got, want in zip(_geometry(prediction), _geometry(series), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    labels = sitk.GetArrayFromImage(prediction)
    assert labels.shape == (12, 20, 16) and set(np.unique(labels)) <= {0, 1, 2, 3}
