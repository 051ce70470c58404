"""Inference inputs: the files a ``--input_path`` names, as data dicts the inference configs
transform (one image per case, or one file per channel of a multi-channel case), each checked before
the engine starts so that a bad one is refused in one line naming it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg_monai.data.registry import DatasetError, get_dataset
from medseg_monai.dicom import is_dicom_series_folder, series_case
from medseg_monai.errors import InputError
from medseg_monai.transforms import CheckFilesd

__all__ = ["channel_cases", "image_files", "require_file"]


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file, else a one-line ``InputError`` naming ``what`` it should be."""
    if not Path(path).is_file():
        raise InputError(f"{what} not found: {path}")
    return path


def image_files(
    path: str, suffixes: Sequence[str] = (".png",), spatial_dims: int | None = None, grey: bool = False
) -> list[dict[str, str]]:
    """Inference inputs: one file, or every file with one of ``suffixes`` in a folder, as
    ``{"image": path, "case_id": name}`` dicts (the name without its suffixes); for a volume
    (``spatial_dims`` 3), a folder of one DICOM series is one case (``medseg_monai.dicom``).
    Each file is checked before the engine starts (readable; a NIfTI of ``spatial_dims`` dimensions), so a bad one is
    refused in one line naming it rather than failing inside the evaluator's run; with ``grey``, a
    colour picture (RGB, RGBA, ...) too."""
    p = Path(path).expanduser().resolve()
    if spatial_dims == 3 and is_dicom_series_folder(p):  # a DICOM series' folder: one volume, read by ITK
        return [series_case(p, spatial_dims)]
    files = sorted(f for f in p.iterdir() if f.name.lower().endswith(tuple(suffixes))) if p.is_dir() else [p]
    if not files or not files[0].is_file():
        raise DatasetError(f"no input image at {p} (expected a file or a folder of {', '.join(suffixes)})")
    items = [{"image": str(f), "case_id": f.name.split(".")[0]} for f in files]
    check = CheckFilesd("image", spatial_dims=spatial_dims, grey_keys="image" if grey else ())
    for item in items:
        check(item)
    return items


def channel_cases(path: str | Sequence[str], dataset: str, channels: Sequence[str]) -> list[dict[str, Any]]:
    """Multi-channel inference inputs as ``{"image": [one path per channel], "case_id": ..., <channel>:
    path, ...}`` (the registry's datalist shape):

    - one case as a list of files, one per channel in ``channels`` order (on the command line a
      comma-separated string);
    - a case folder, or a folder of case folders: in each, the file of channel ``c`` is the one
      whose name ends as the file of ``c`` does in ``dataset``'s layout (``_t1ce.nii.gz`` in
      BraTS 2018, ``T1c_subtrMeanDivStd.nii.gz`` in the BRATS 2015 files).

    A case folder that lacks a channel stops with one line naming the folder and the channel.
    """
    files = [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path).split(",")
    if len(files) > 1:
        if len(files) != len(channels):
            raise DatasetError(
                f"one case needs {len(channels)} files ({', '.join(channels)}), got {len(files)}"
            )
        for f in files:
            if not Path(f).expanduser().is_file():
                raise DatasetError(f"no input image at {Path(f).expanduser().resolve()}")
        paths = [str(Path(f).expanduser().absolute()) for f in files]
        return [
            {
                "image": paths,
                "case_id": Path(files[0]).name.split(".")[0],
                **dict(zip(channels, paths, strict=True)),
            }
        ]
    layout = get_dataset(dataset).layout["images"]
    tails = {c: Path(layout[c]).name.rsplit("}", 1)[-1].lower() for c in channels}
    root = Path(files[0]).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"{root}: give a case folder, a folder of case folders, or {len(channels)} files ({', '.join(channels)})"
        )

    def match(folder: Path) -> dict[str, list[Path]]:
        names = sorted(p for p in folder.iterdir() if p.is_file())
        return {c: [p for p in names if p.name.lower().endswith(t)] for c, t in tails.items()}

    own = match(root)
    folders = [root] if any(own.values()) else sorted(p for p in root.iterdir() if p.is_dir())
    cases = []
    for folder in folders:
        found = own if folder == root else match(folder)
        if not any(found.values()):
            continue
        for c, hits in found.items():
            if len(hits) != 1:
                what = "no file" if not hits else f"{len(hits)} files"
                raise DatasetError(
                    f"case folder {folder}: {what} for channel '{c}' (a name ending '{tails[c]}')"
                )
        paths = [str(found[c][0]) for c in channels]
        cases.append({"image": paths, "case_id": folder.name, **dict(zip(channels, paths, strict=True))})
    if not cases:
        raise DatasetError(f"no case under {root}: no file name ends as {', '.join(tails.values())}")
    return cases
