"""Loading, checking and saving transforms (MONAI's ``io`` family).

MONAI loads the files (``LoadImaged``; ``reader="PILReader"`` for JSRT PNG palette indices and
SCR GIF masks); these check them before and after loading (one line naming the case and the file
instead of a reader's traceback), load per-structure mask files, give the volume bundles one list
of loading steps (:func:`load_volumes`), and write predictions as label PNGs, overlay figures and,
for a DICOM series, a DICOM Segmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, LoadImage, LoadImaged, MapTransform, Orientationd
from PIL import Image

from medseg_monai.data.registry import DatasetError
from medseg_monai.dicom import is_dicom_series_folder, write_seg
from medseg_monai.errors import InputError
from medseg_monai.transforms.labels import RemapLabelsd, class_indices
from medseg_monai.visualize import blend_labels, volume_overlay

__all__ = [
    "CheckFilesd",
    "CheckGeometryd",
    "CheckIntensityd",
    "LoadMasksd",
    "SaveDicomSegd",
    "SaveLabelPNGd",
    "SaveVolumeOverlayd",
    "apply_palette",
    "load_volumes",
]

logger = logging.getLogger(__name__)


class CheckFilesd(MapTransform):
    """Check that the files named under ``keys`` (a path or a list of paths) can be read, before
    loading: one line naming the case and the first bad file, instead of MONAI trying and logging
    every reader.

    PNG/GIF/JPEG/BMP/TIFF are verified with PIL; NIfTI headers are read with nibabel and the data
    checked to be all there (a ``.nii.gz`` is decompressed to its end, so a truncated or corrupt
    download is caught; a ``.nii`` must be as long as its header says); other formats are only
    checked to exist and be non-empty. With ``spatial_dims`` (3 for the volume bundles) a NIfTI
    holding more dimensions (a 4D cine series, several channels in one file) is refused too. A
    NIfTI whose voxel spacing is zero or not finite, or whose affine is singular (no position for
    its voxels), is refused: nibabel would take a zero spacing for 1 mm, and MONAI would resample a
    singular or NaN affine to nothing or to NaN, silently.
    The files under ``grey_keys`` must be grey images: an RGB, RGBA, grey + alpha or colour-palette
    picture is refused (convert it yourself, e.g. ``PIL.Image.open(f).convert("L")``: which channel
    mix is right is the user's call, not the loader's).
    """

    _PIL = (".png", ".gif", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

    _GREY_MODES = ("1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int | None = None,
        allow_missing_keys: bool = False,
        grey_keys: KeysCollection = (),
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.grey_keys = {grey_keys} if isinstance(grey_keys, str) else set(grey_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = f"case '{d['case_id']}': " if "case_id" in d else ""
        for key in self.key_iterator(d):
            for path in [d[key]] if isinstance(d[key], (str, Path)) else d[key]:
                self._check(str(path), case, grey=key in self.grey_keys)
        return d

    def _check(self, path: str, case: str = "", grey: bool = False) -> None:
        import gzip

        import nibabel

        try:
            size = Path(path).stat().st_size
            if size == 0:
                raise DatasetError(f"{case}{path}: empty file")
            if path.lower().endswith(self._PIL):
                with Image.open(path) as img:
                    img.verify()
                    mode, palette = img.mode, img.palette
                colour = mode not in self._GREY_MODES and not (mode == "P" and _grey_palette(palette))
                if grey and colour:
                    raise DatasetError(
                        f"{case}{path}: a colour image ({mode}) where a grey radiograph is expected: "
                        "save it as grey (e.g. PIL.Image.open(f).convert('L'))"
                    )
            elif path.lower().endswith((".nii", ".nii.gz")):
                image = nibabel.load(path)
                shape = tuple(image.shape)
                while len(shape) > (self.spatial_dims or len(shape)) and shape[-1] == 1:
                    shape = shape[:-1]  # (X, Y, Z, 1) is a volume
                if self.spatial_dims and len(shape) != self.spatial_dims:
                    hint = (
                        "a cine or time series: one file per frame"
                        if len(shape) > self.spatial_dims
                        else "a slice"
                    )
                    raise DatasetError(
                        f"{case}{path}: a {len(shape)}D image ({' x '.join(map(str, shape))}) where one "
                        f"{self.spatial_dims}D volume is expected ({hint})"
                    )
                _check_geometry(image, f"{case}{path}")
                if path.lower().endswith(".gz"):
                    with gzip.open(path, "rb") as f:
                        while f.read(1 << 24):  # to the end: a truncated stream raises here
                            pass
                else:
                    header = image.header
                    expected = (
                        int(getattr(image.dataobj, "offset", 0))
                        + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
                    )
                    if size < expected:
                        raise DatasetError(
                            f"{case}{path}: truncated ({size} bytes, the header needs {expected})"
                        )
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"{case}{path}: cannot read this file ({type(e).__name__}: {e})") from e


def _grey_palette(palette: Any) -> bool:
    """Whether a PIL palette maps every index to a grey (R = G = B)."""
    if palette is None:
        return False
    colours = np.frombuffer(bytes(palette.palette), dtype=np.uint8)
    rgb = colours[: len(colours) // 3 * 3].reshape(-1, 3) if palette.mode == "RGB" else None
    return rgb is not None and bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())


def _check_geometry(image: Any, where: str) -> None:
    """A NIfTI's voxel spacing (its header's pixdim, as written) must be non-zero and finite, and its
    affine (the one MONAI reads) finite and invertible: else one line naming the file."""
    from nibabel.openers import ImageOpener

    spatial = min(3, len(image.shape))
    with ImageOpener(image.get_filename()) as f:  # as written: nibabel's loader sets a zero pixdim to 1
        raw = type(image.header).from_fileobj(f, check=False)
    zooms = [float(z) for z in raw["pixdim"][1 : spatial + 1]]
    if not all(np.isfinite(z) and z != 0 for z in zooms):
        raise DatasetError(
            f"{where}: voxel spacing {' x '.join(f'{z:g}' for z in zooms)} mm (header pixdim): a spacing "
            "of zero or not a number; fix the file's header"
        )
    affine = np.asarray(image.affine, dtype=float)
    singular = not np.isfinite(affine).all()
    if not singular:
        values = np.linalg.svd(affine[:3, :3], compute_uv=False)
        singular = values.min() <= 1e-6 * values.max()
    if singular:
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in affine[:3])
        raise DatasetError(
            f"{where}: its affine ({rows}) is singular or not finite: no position for its voxels; fix "
            "the file's header (sform/qform)"
        )


class CheckGeometryd(MapTransform):
    """Before loading: every NIfTI under ``keys`` (paths or lists of paths, e.g. FLAIR and T1 and
    the label) of a case must share one shape and, within ``atol`` mm, one affine. A mismatch
    stops with one line naming the case and both files, instead of a failed stack or a silently
    misaligned label."""

    def __init__(
        self,
        keys: KeysCollection,
        id_key: str = "case_id",
        atol: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.id_key = id_key
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import nibabel

        d = dict(data)
        paths = [
            str(p)
            for key in self.key_iterator(d)
            for p in ([d[key]] if isinstance(d[key], (str, Path)) else d[key])
        ]
        first = nibabel.load(paths[0])
        case = d.get(self.id_key, paths[0])
        for path in paths[1:]:
            other = nibabel.load(path)
            if other.shape[:3] != first.shape[:3]:
                raise DatasetError(
                    f"case '{case}': {path} has shape {other.shape[:3]} but {paths[0]} has {first.shape[:3]}"
                )
            if not np.allclose(other.affine, first.affine, atol=self.atol):
                raise DatasetError(f"case '{case}': the affine of {path} differs from that of {paths[0]}")
        return d


class CheckIntensityd(MapTransform):
    """After loading: no NaN or infinite voxel, and no all-zero channel, in ``keys`` (C, *spatial);
    otherwise one line naming the case and the file. A multi-file image keeps only its first
    file's name in its metadata: ``channel_keys`` name the data-dict keys that hold each channel's
    file (the registry's datalists and ``medseg_monai.data.inputs.channel_cases`` carry one per channel)."""

    def __init__(
        self,
        keys: KeysCollection,
        id_key: str = "case_id",
        channel_keys: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.id_key = id_key
        self.channel_keys = list(channel_keys or [])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            names = (getattr(d[key], "meta", {}) or {}).get("filename_or_obj", key)
            names = names if isinstance(names, (list, tuple)) else [names] * img.shape[0]
            if len(self.channel_keys) == img.shape[0] and all(k in d for k in self.channel_keys):
                names = [d[k] for k in self.channel_keys]
            case = d.get(self.id_key, "?")
            for c in range(img.shape[0]):
                if not torch.isfinite(img[c]).all():
                    n = int((~torch.isfinite(img[c])).sum())
                    raise DatasetError(f"case '{case}': {names[c]} has {n} NaN or infinite voxels")
                if not img[c].any():
                    raise DatasetError(f"case '{case}': {names[c]} is all zero")
        return d


class LoadMasksd(MapTransform):
    """Load the per-structure mask files listed under each key into one (M, *spatial) stack.

    For layouts with one binary mask file per structure (SCR: ``masks/<structure>/<id>.gif``).
    Unlike loading the list with ``LoadImaged``, a mask whose size differs from the case's other
    masks stops with one line naming that file (check readability first with :class:`CheckFilesd`).
    """

    def __init__(self, keys: KeysCollection, reader: Any = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(reader=reader, image_only=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = [d[key]] if isinstance(d[key], (str, Path)) else list(d[key])
            masks = []
            for path in paths:
                masks.append(self.loader(path))
                if masks[-1].shape != masks[0].shape:
                    raise DatasetError(
                        f"{path}: mask size {tuple(masks[-1].shape)} differs from {tuple(masks[0].shape)} of {paths[0]}"
                    )
            d[key] = MetaTensor(torch.stack([torch.as_tensor(m) for m in masks]), meta=dict(masks[0].meta))
        return d


def load_volumes(
    keys: Sequence[str] | str = ("image", "label"),
    axcodes: str = "RAS",
    label_mapping: Mapping[int, int] | None = None,
    channel_keys: Sequence[str] | None = None,
    check_geometry: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    **remap: Any,
) -> list[Any]:
    """The volume bundles' loading steps, one list for training, validation and inference: check
    the files (and, with ``check_geometry``, that a case's NIfTI files share shape and affine),
    load them channel first, check the image's intensities (``channel_keys``: one data-dict key
    per channel file, for messages), orient to ``axcodes`` (nibabel's axis labels, named so MONAI
    does not warn) and, when ``label_mapping`` is given and ``label_key`` is among ``keys``, map
    file values to class indices (``remap``: e.g. ``ignore_values``, ``ignore_index``).

    Images (C, *spatial) and labels (1, *spatial) leave it as MetaTensors on the file's grid.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    steps: list[Any] = [CheckFilesd(keys, spatial_dims=3)]
    if check_geometry:
        steps.append(CheckGeometryd(keys))
    steps += [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        CheckIntensityd(image_key, channel_keys=channel_keys),
        Orientationd(keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if label_mapping is not None and label_key in keys:
        steps.append(RemapLabelsd(label_key, label_mapping, **remap))
    return steps


def apply_palette(image: Image.Image) -> Image.Image:
    """Render a palette ("P") image through its palette to grayscale; other modes pass unchanged.

    Use as ``monai.data.PILReader(converter=apply_palette)``. The JSRT PNGs (Shiraishi et al.,
    AJR 2000) are 8-bit palette images whose palette is inverted (index i shows as 255 - i): the
    raw indices are a negative (bright air, dark heart); the rendered gray is the radiograph as
    displayed, with dark lungs and a bright mediastinum. A colour palette is refused.
    """
    if image.mode != "P":
        return image
    palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    if not (palette[:, 0] == palette[:, 1]).all() or not (palette[:, 1] == palette[:, 2]).all():
        raise ValueError(f"{getattr(image, 'filename', 'image')}: colour palette, expected a grayscale one")
    gray = palette[np.asarray(image), 0]
    return Image.fromarray(gray, mode="L")


class SaveLabelPNGd(MapTransform):
    """Write a 2D prediction as ``<case_id>_label.png`` (uint8 class indices, 0 = background) and
    ``<case_id>_overlay.png`` (the image with classes in colour) into ``output_dir``.

    ``pred`` is (C, H, W) probabilities/one-hot or (1, H, W) indices, at the size the files should
    have; ``image_key`` the (1, H, W) image of the same size. Arrays from ``PILReader`` are (x, y),
    so ``transpose=True`` writes them upright, as the input was stored.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        image_key: str = "image",
        id_key: str = "case_id",
        transpose: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.id_key = id_key
        self.transpose = transpose

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        image = torch.as_tensor(d[self.image_key]).detach().cpu().float()[0].numpy()
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).detach().cpu()
            classes = (class_indices(pred)[0] if pred.shape[0] > 1 else pred[0]).numpy().astype(np.uint8)
            img = image
            if self.transpose:
                classes, img = classes.T, img.T
            stem = self.output_dir / str(d[self.id_key])
            Image.fromarray(classes, mode="L").save(f"{stem}_label.png")
            Image.fromarray(blend_labels(img, classes)).save(f"{stem}_overlay.png")
        return d


class SaveDicomSegd(MapTransform):
    """For a case read from a DICOM series' folder: the label map under ``keys`` ((1, X, Y, Z) label
    values on the series' grid, as written to NIfTI: after ``Invertd``) also as a DICOM
    Segmentation, ``<output_dir>/<folder name>_<postfix>.dcm``, one segment per foreground class
    (:func:`medseg_monai.dicom.write_seg`). Other inputs pass untouched. Without ``highdicom``
    installed one log line says how to get it and the case goes on (its NIfTI is written anyway).

    ``values`` and ``names``: the label value and the name of each class index (0 the background),
    e.g. a study's ``class_values`` and ``class_names``."""

    def __init__(
        self,
        keys: KeysCollection,
        values: Sequence[int],
        names: Sequence[str],
        output_dir: str,
        postfix: str = "seg",
        algorithm: str = "medseg-monai",
    ) -> None:
        super().__init__(keys)
        if len(values) != len(names):
            raise InputError(f"DICOM SEG: {len(values)} class values but {len(names)} class names")
        self.segments = {int(v): str(n) for v, n in zip(values, names, strict=True) if int(v) != 0}
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.algorithm = algorithm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            source = str(getattr(label, "meta", {}).get("filename_or_obj", ""))
            if not source or not is_dicom_series_folder(source):
                continue
            target = self.output_dir / f"{Path(source).name}_{self.postfix}.dcm"
            try:
                import highdicom  # noqa: F401  (write_seg's; checked here to say how to get it)
            except ImportError:
                logger.warning(
                    "%s not written: DICOM SEG output needs highdicom: pip install -e .[dicom]", target
                )
                continue
            labels = torch.as_tensor(label).detach().cpu()[0].numpy().astype(np.int64)
            affine = torch.as_tensor(label.affine).detach().cpu().numpy()
            write_seg(labels, affine, source, self.segments, target, self.algorithm)
        return d


class SaveVolumeOverlayd(MapTransform):
    """Write ``<output_dir>/<name>_overlay.png``: :func:`volume_overlay` of ``image_key`` (C, X, Y, Z)
    with ``keys`` (a (1, X, Y, Z) mask or class indices on the same grid), named after the image's
    file (its MONAI metadata), so a segmented volume can be checked at a glance."""

    def __init__(self, keys: Any, image_key: str, output_dir: str, n_slices: int = 4, axis: int = -1) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.n_slices = n_slices
        self.axis = axis

    def __call__(self, data: Any) -> Any:
        d = dict(data)
        image = d[self.image_key]
        name = Path(str(getattr(image, "meta", {}).get("filename_or_obj", "volume"))).name.split(".")[0]
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key]).detach().cpu()[0].numpy()
            vol = torch.as_tensor(image).detach().cpu()[0].float().numpy()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            volume_overlay(vol, label, self.n_slices, self.axis).save(self.output_dir / f"{name}_overlay.png")
        return d
