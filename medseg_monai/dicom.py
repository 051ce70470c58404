"""DICOM series as inference input: a folder holding the slices of one series is one case.

MONAI's ``LoadImaged`` reads such a folder with its ``ITKReader`` (for a folder its automatic
choice: NIfTI files still go to nibabel), which sorts the slices by position through GDCM and gives
the volume the series' spacing, origin and direction (an RAS affine); the volume bundles' inference
then writes the prediction as NIfTI with that affine, i.e. in the series' geometry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg_monai.data import DatasetError
from medseg_monai.errors import InputError

__all__ = ["is_dicom_series_folder", "series_case"]

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
