"""DICOM series as inference input: a folder holding the slices of one series is one case.

MONAI's ``LoadImaged`` reads such a folder with its ``ITKReader`` (for a folder its automatic
choice: NIfTI files still go to nibabel), which sorts the slices by position through GDCM and gives
the volume the series' spacing, origin and direction (an RAS affine); the volume bundles' inference
then writes the prediction as NIfTI with that affine, i.e. in the series' geometry, and
:func:`write_seg` (``medseg_monai.transforms.SaveDicomSegd``) the same voxels as a DICOM
Segmentation referencing the series' slices (``highdicom``: ``pip install -e .[dicom]``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medseg_monai import __version__
from medseg_monai.data import DatasetError
from medseg_monai.errors import InputError

__all__ = [
    "is_dicom_series_folder",
    "label_frames",
    "segment_codes",
    "series_case",
    "series_slices",
    "write_seg",
]

_PREAMBLE = 128  # DICOM Part 10: a 128-byte preamble, then "DICM"


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(_PREAMBLE)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose files include DICOM files (Part 10, ``DICM`` after the
    preamble), whatever their names (scanners often write none)."""
    p = Path(path)
    return p.is_dir() and any(_is_dicom_file(f) for f in sorted(p.iterdir()) if f.is_file())


def series_case(path: str | Path, spatial_dims: int | None = None) -> dict[str, Any]:
    """The inference case of the DICOM series in folder ``path``: ``{"image": <folder>, "case_id":
    <folder name>}``. Refused in one line: no ``itk`` installed, several series in the folder (give
    one series' folder), a series whose slices do not make one ``spatial_dims``-D volume."""
    p = Path(path).expanduser().resolve()
    try:
        import itk
    except ImportError:
        raise InputError(f"{p}: reading a DICOM series needs itk: pip install itk") from None
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(str(p))
    series = list(names.GetSeriesUIDs())
    if len(series) != 1:
        what = "no DICOM image series" if not series else f"{len(series)} DICOM series"
        raise DatasetError(f"{p}: {what} in this folder; give the folder of one series")
    files = list(names.GetFileNames(series[0]))
    if spatial_dims == 3 and len(files) < 2:
        raise DatasetError(f"{p}: the series has {len(files)} slice; a volume of several slices is expected")
    return {"image": str(p), "case_id": p.name}


# SegmentedPropertyCategory and Type (pydicom's SNOMED CT keywords) of the classes the volume
# bundles write; any other class gets the generic category Tissue and a private type code (99MEDSEG)
_SEGMENT_CODES = {
    "myocardium": ("AnatomicalStructure", "LeftVentricleMyocardium"),
    "lv_cavity": ("AnatomicalStructure", "LeftVentricle"),
    "rv_cavity": ("AnatomicalStructure", "RightVentricle"),
    "femur": ("AnatomicalStructure", "Femur"),
    "tibia": ("AnatomicalStructure", "Tibia"),
    "fibula": ("AnatomicalStructure", "Fibula"),
    "bone": ("AnatomicalStructure", "Bone"),
    "wmh": ("MorphologicallyAbnormalStructure", "Lesion"),
    "lesion": ("MorphologicallyAbnormalStructure", "Lesion"),
    "edema": ("MorphologicallyAbnormalStructure", "Edema"),
    "necrotic_core": ("MorphologicallyAbnormalStructure", "Necrosis"),
    "necrosis": ("MorphologicallyAbnormalStructure", "Necrosis"),
    "enhancing": ("MorphologicallyAbnormalStructure", "Neoplasm"),
    "non_enhancing": ("MorphologicallyAbnormalStructure", "Neoplasm"),
}


def segment_codes(name: str) -> tuple[Any, Any]:
    """(SegmentedPropertyCategory, SegmentedPropertyType) of class ``name`` as pydicom ``Code``s: a
    SNOMED CT code where one fits, else category Tissue and the private code ``99MEDSEG`` ``name``."""
    from pydicom.sr.codedict import codes  # the [dicom] extra's
    from pydicom.sr.coding import Code

    if name in _SEGMENT_CODES:
        category, kind = _SEGMENT_CODES[name]
        return getattr(codes.SCT, category), getattr(codes.SCT, kind)
    return codes.SCT.Tissue, Code(value=name[:16], scheme_designator="99MEDSEG", meaning=name)


def series_slices(path: str | Path) -> list[Any]:
    """The pydicom datasets (pixel data not read) of the series in folder ``path``, in the order of
    their position along the slice normal (as GDCM sorts them for ITK)."""
    import pydicom  # the [dicom] extra's

    slices = [
        pydicom.dcmread(f, stop_before_pixels=True)
        for f in sorted(Path(path).iterdir())
        if f.is_file() and _is_dicom_file(f)
    ]
    slices = [s for s in slices if "ImagePositionPatient" in s]
    if not slices:
        raise DatasetError(f"{path}: no DICOM image slices with a position")
    normal = np.cross(*np.asarray(slices[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    return sorted(slices, key=lambda s: float(normal @ np.asarray(s.ImagePositionPatient, dtype=float)))


def label_frames(labels: np.ndarray, affine: np.ndarray, slices: list[Any]) -> np.ndarray:
    """The (n, rows, columns) frames of the label map ``labels`` (X, Y, Z, on the grid of the RAS
    ``affine``, e.g. the series as MONAI's ITKReader reads it) on each of the ``slices``' pixel
    grids: the pixel (r, c) of a slice is the voxel at its position
    (ImagePositionPatient + c * column spacing * row direction + r * row spacing * column direction).
    Refused in one line where a slice's pixels are not voxels of ``labels`` (another grid)."""
    to_voxel = np.linalg.inv(
        np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)
    )  # LPS mm -> ijk
    frames = []
    for s in slices:
        row_dir, col_dir = np.asarray(s.ImageOrientationPatient, dtype=float).reshape(2, 3)
        row_spacing, col_spacing = (float(v) for v in s.PixelSpacing)
        origin = to_voxel @ np.append(np.asarray(s.ImagePositionPatient, dtype=float), 1.0)
        step_c = to_voxel[:3, :3] @ (col_spacing * row_dir)  # one column to the right, in voxels
        step_r = to_voxel[:3, :3] @ (row_spacing * col_dir)  # one row down
        r, c = np.mgrid[0 : int(s.Rows), 0 : int(s.Columns)]
        ijk = origin[:3, None, None] + step_r[:, None, None] * r + step_c[:, None, None] * c
        index = np.rint(ijk).astype(int)
        inside = all((index[a] >= 0).all() and (index[a] < labels.shape[a]).all() for a in range(3))
        # a tenth of a voxel: the files' decimal positions and ITK's one slice spacing for the series
        # move centres a little; further off, the slice is not on the grid the prediction is on
        if not inside or np.abs(ijk - index).max() > 0.1:
            raise InputError(f"slice {s.SOPInstanceUID}: its pixels are not voxels of the prediction's grid")
        frames.append(labels[index[0], index[1], index[2]])
    return np.stack(frames)


def write_seg(
    labels: np.ndarray,
    affine: np.ndarray,
    series: str | Path,
    segments: Mapping[int, str],
    path: str | Path,
    algorithm: str = "medseg-monai",
) -> Path:
    """Write the label map ``labels`` (X, Y, Z on the grid of the RAS ``affine``) as a binary DICOM
    Segmentation of the series in folder ``series``: one segment per ``segments`` item (label value
    -> class name; value 0, the background, is none), numbered 1, 2, ... in value order, one frame
    per source slice and segment holding any of it, referencing the slices' SOP instances and so
    their frame of reference and geometry. Needs ``highdicom`` (``ImportError`` otherwise)."""
    import highdicom as hd  # the [dicom] extra (with pydicom): only where a SEG is written
    from pydicom.sr.codedict import codes

    slices = series_slices(series)
    frames = label_frames(np.asarray(labels), affine, slices)
    values = sorted(v for v in segments if v != 0)
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        category, kind = segment_codes(segments[value])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segments[value],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
            )
        )
    quiet = logging.getLogger("highdicom")  # it logs every module it copies at INFO: 9 lines a SEG
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        seg = hd.seg.Segmentation(
            source_images=slices,
            pixel_array=np.stack([frames == v for v in values], axis=-1),  # (frames, rows, columns, segments)
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(getattr(slices[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg-monai",
            manufacturer_model_name=algorithm,
            software_versions=__version__,
            device_serial_number="none",
            series_description=f"{algorithm} segmentation",
        )
    # highdicom's needs of the slices (FrameOfReferenceUID, SliceThickness, ...)
    except (ValueError, AttributeError) as e:
        raise InputError(f"{series}: no DICOM SEG written: {e}") from None
    finally:
        quiet.setLevel(level)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path
