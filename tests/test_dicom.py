"""DICOM in (issue #40 item 5): a folder of one DICOM series is one inference case, read through ITK,
and its prediction is written as NIfTI on the series' grid and as a DICOM Segmentation referencing
the series' slices. The series is written here from a synthetic volume with an oblique direction,
anisotropic spacing and an origin off zero."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bundle_utils import error_lines, parse, parse_study, run_bundle
from medseg_monai.config import at_repo_root, config_files
from medseg_monai.data import DatasetError
from medseg_monai.data.inputs import image_files
from medseg_monai.errors import InputError
from medseg_monai.transforms import SaveDicomSegd

UID_ROOT = "1.2.826.0.1.3680043.2.1125.40"
SPACING = (0.9, 1.1, 3.0)  # x, y, z in mm
ORIGIN = (-40.5, 12.25, 7.0)  # LPS, mm
ANGLE = 0.3  # rad about z: an oblique in-plane direction
DIRECTION = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def write_series(
    folder: Path, volume_zyx: np.ndarray, series: str = "1", study: str = "1", frame_of_reference: bool = True
) -> sitk.Image:
    """Write ``volume_zyx`` (int16) as a DICOM MR series, one file per slice (no suffix, as scanners
    often name them), each with its ImagePositionPatient and the series' ImageOrientationPatient;
    with the study's FrameOfReferenceUID (one patient space; empty without ``frame_of_reference``);
    returns the volume as SimpleITK holds it (its geometry is what the files must say)."""
    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    root = UID_ROOT
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
            ("0020|0052", f"{root}.{study}.0"),  # FrameOfReferenceUID
            ("0018|0050", f"{SPACING[2]}"),  # SliceThickness (DICOM SEG copies it)
            ("0008|0018", f"{root}.{study}.{series}.{k + 1}"),
            ("0020|0013", str(k + 1)),
            ("0020|0032", position),
            ("0020|0037", orientation),
        ):
            if tag != "0020|0052" or frame_of_reference:
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
    """LV's inference (quick profile, an untrained network's seeded weights: only the geometry
    matters) on a DICOM series: the prediction's NIfTI has the series' size, spacing, origin and
    direction, and its DICOM SEG holds the same label map voxel for voxel on the series' slices."""
    torch.manual_seed(40)  # weights whose map holds several classes (checked below)
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
    assert len(np.unique(labels)) > 1  # so the SEG's comparison below is not of one class
    _check_seg(out / "patient7_seg.dcm", labels, dict(zip(*_lv_classes(), strict=True)))


def _lv_classes() -> tuple[list[int], list[str]]:
    """LV's label value and name of each class index (quick profile: the synthetic dataset's)."""
    parser = parse_study("lv", profile="quick")
    return parser.get_parsed_content("class_values"), parser.get_parsed_content("class_names")


def _check_seg(path: Path, labels_zyx: np.ndarray, names: dict[int, str]) -> None:
    """The DICOM SEG at ``path`` holds ``labels_zyx`` (label values on the test series' grid: slice k
    is the file of instance k + 1, rows along y, columns along x) voxel for voxel, one segment per
    foreground class of ``names`` (label value -> name) in value order, and references the series'
    slices, their frame of reference and their positions."""
    hd = pytest.importorskip("highdicom")
    seg = hd.seg.segread(str(path))
    uids = [f"{UID_ROOT}.1.1.{k + 1}" for k in range(labels_zyx.shape[0])]
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == f"{UID_ROOT}.1.1"
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(uids)
    assert seg.FrameOfReferenceUID == f"{UID_ROOT}.1.0"
    assert seg.SegmentationType == "BINARY"
    values = sorted(v for v in names if v != 0)
    numbers = list(seg.get_segment_numbers())
    assert numbers == list(range(1, len(values) + 1))
    assert [seg.get_segment_description(n).segment_label for n in numbers] == [names[v] for v in values]
    # every frame lies where its source slice lies (the SEG's own geometry, not only its references)
    series_grid = sitk.Image(labels_zyx.shape[::-1], sitk.sitkUInt8)
    series_grid.SetSpacing(SPACING)
    series_grid.SetOrigin(ORIGIN)
    series_grid.SetDirection(DIRECTION)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uids.index(source)
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(position, series_grid.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-4)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers)
    assert pixels.shape == (*labels_zyx.shape, len(values))
    for s, value in enumerate(values):
        np.testing.assert_array_equal(pixels[..., s].astype(bool), labels_zyx == value)


def test_a_label_map_on_a_series_is_written_as_dicom_seg_voxel_for_voxel(tmp_path: Path) -> None:
    """SaveDicomSegd on an asymmetric label map on the series' grid held in another orientation (RAS,
    as the volume bundles compute): the SEG's frames are the label map's slices in the series' own
    slice order and in-plane orientation, named and coded after the classes."""
    pytest.importorskip("highdicom")
    from monai.transforms import LoadImage, Orientation

    write_series(tmp_path / "patient3", _volume())
    image = LoadImage(image_only=True, reader="ITKReader")(str(tmp_path / "patient3"))  # x, y, z
    labels = np.zeros(image.shape, dtype=np.int64)
    labels[2:6, 3:9, 1:4] = 2
    labels[8:12, 10:15, 5:11] = 3
    labels[0, 0, 0] = 3  # a corner: a flipped axis or slice order would move it
    pred = image.clone()
    pred.set_array(torch.as_tensor(labels, dtype=torch.float32)[None])
    pred = Orientation(axcodes="RAS", labels=None)(pred)
    assert not np.array_equal(pred[0].numpy(), labels)  # the orientation did change the array
    out = tmp_path / "out"
    SaveDicomSegd(
        "pred", values=[0, 2, 3], names=["background", "myocardium", "lv_cavity"], output_dir=str(out)
    )({"pred": pred})
    _check_seg(out / "patient3_seg.dcm", labels.transpose(2, 1, 0), {2: "myocardium", 3: "lv_cavity"})
    import highdicom as hd

    seg = hd.seg.segread(str(out / "patient3_seg.dcm"))
    myocardium, cavity = (seg.get_segment_description(n) for n in (1, 2))
    assert myocardium.segmented_property_type.meaning == "Left Ventricle Myocardium"
    assert cavity.segmented_property_category.meaning == "Anatomical Structure"
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == f"{UID_ROOT}.1"


def test_a_prediction_on_another_grid_is_refused_in_one_line(tmp_path: Path) -> None:
    """label_frames looks each slice pixel up in the prediction's grid: the series' own grid gives
    its voxels back, the same grid half a voxel off is refused (no nearest-voxel guessing)."""
    pytest.importorskip("pydicom")
    from monai.transforms import LoadImage

    from medseg_monai.dicom import label_frames, series_slices

    volume = _volume()
    write_series(tmp_path / "patient5", volume)
    image = LoadImage(image_only=True, reader="ITKReader")(str(tmp_path / "patient5"))
    slices = series_slices(tmp_path / "patient5")
    affine = image.affine.numpy()
    np.testing.assert_array_equal(label_frames(np.asarray(image), affine, slices), volume)
    shifted = affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    with pytest.raises(
        InputError, match=r"^slice [0-9.]+: its pixels are not voxels of the prediction's grid$"
    ):
        label_frames(np.asarray(image), shifted, slices)


def test_dicom_seg_is_only_written_for_a_series(tmp_path: Path) -> None:
    """A NIfTI input's prediction passes SaveDicomSegd untouched, nothing written."""
    from monai.data import MetaTensor

    pred = MetaTensor(torch.ones(1, 4, 4, 3), meta={"filename_or_obj": str(tmp_path / "case.nii.gz")})
    out = tmp_path / "out"
    assert SaveDicomSegd("pred", [0, 1], ["background", "wmh"], str(out))({"pred": pred})["pred"] is pred
    assert not out.exists()


def test_a_series_without_a_frame_of_reference_is_refused_in_one_line(tmp_path: Path) -> None:
    """DICOM SEG needs the slices' FrameOfReferenceUID (its geometry's reference): one line, no file."""
    pytest.importorskip("highdicom")
    from monai.transforms import LoadImage

    write_series(tmp_path / "patient4", _volume(), frame_of_reference=False)
    pred = LoadImage(image_only=True, reader="ITKReader", ensure_channel_first=True)(
        str(tmp_path / "patient4")
    )
    save = SaveDicomSegd("pred", [0, 1], ["background", "wmh"], str(tmp_path / "out"))
    with pytest.raises(
        InputError, match=r"patient4: no DICOM SEG written: Source images have no Frame Of Reference UID"
    ):
        save({"pred": (pred > 500).float()})
    assert not (tmp_path / "out").exists()


def test_without_highdicom_a_series_gets_its_nifti_and_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """LV's inference on a series, run in this process with highdicom's import failing: the NIfTI is
    written, no SEG, and one log line says how to get it."""
    network = parse_study("lv", profile="quick").get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "model.pt")
    write_series(tmp_path / "patient7", _volume())
    out = tmp_path / "pred"
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom raises ImportError
    parser = parse(
        config_files("lv", "inference", profile="quick"),
        {
            "input_path": str(tmp_path / "patient7"),
            "ckpt_path": str(tmp_path / "model.pt"),
            "output_dir": str(out),
        },
    )
    with caplog.at_level(logging.INFO), at_repo_root():
        parser.get_parsed_content("infer#evaluator").run()
    assert sorted(p.name for p in out.iterdir()) == ["patient7_seg.nii.gz"]
    lines = [r.getMessage() for r in caplog.records if "DICOM SEG" in r.getMessage()]
    assert lines == [
        f"{out / 'patient7_seg.dcm'} not written: DICOM SEG output needs highdicom: pip install -e .[dicom]"
    ]
