"""Dictionary transforms for the registry's label conventions.

MONAI loads the files (``LoadImaged``; ``reader="PILReader"`` for JSRT PNG palette indices and
SCR GIF masks); these turn what was loaded into training labels, driven by plain arguments
that ``medseg_monai.data.DatasetSpec`` provides (``label_mapping``, ``ignore_values``,
``mask_classes``, ``regions``), so bundles pass them from configuration.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureChannelFirstd,
    InvertibleTransform,
    LoadImage,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandomizableTransform,
    Resize,
    Spacingd,
    SpatialPadd,
)

from medseg_monai.data.registry import DatasetError

__all__ = [
    "Argmaxd",
    "BackgroundToZerod",
    "CaseGaussianNoised",
    "CheckFilesd",
    "CheckGeometryd",
    "CheckIntensityd",
    "InPlaneGridd",
    "LabelToRegionsd",
    "LoadMasksd",
    "MasksToLabeld",
    "RandStoredRanged",
    "RemapLabelsd",
    "ResizeToMatchd",
    "ScaleByBitDepthd",
    "SpatialPadSliceMinimumd",
    "class_indices",
    "load_volumes",
]


def _source(img: Any, key: Hashable) -> str:
    """The file an item came from, for error messages."""
    meta = getattr(img, "meta", {}) or {}
    name = meta.get("filename_or_obj", key)
    return str(name[0] if isinstance(name, (list, tuple)) else name)


def _like(values: torch.Tensor, img: Any) -> Any:
    """``values`` with ``img``'s metadata when ``img`` is a MetaTensor."""
    if isinstance(img, MetaTensor):
        out = MetaTensor(values, meta=img.meta)
        out.applied_operations = list(img.applied_operations)
        return out
    return values


def class_indices(probabilities: Any, dim: int = 0) -> torch.Tensor:
    """The index of the largest channel along ``dim``, keeping ``dim`` (size 1), as float32.

    The same as ``torch.argmax(..., keepdim=True)`` (the first maximum wins a tie), through
    ``torch.max(...).indices``: on the CPU (torch 2.13, one thread) ``argmax`` over the channel
    axis of a (4, 80, 88, 60) volume takes 100 ms, ``max`` 9 ms.
    """
    values = (
        probabilities.as_tensor() if isinstance(probabilities, MetaTensor) else torch.as_tensor(probabilities)
    )
    return values.max(dim, keepdim=True).indices.to(torch.float32)


class Argmaxd(MapTransform):
    """Class probabilities or logits (C, *spatial) -> class indices (1, *spatial), float32, keeping
    the metadata: MONAI's ``AsDiscreted(argmax=True)`` at a tenth of its CPU cost
    (:func:`class_indices`); one-hot encode after it with ``AsDiscreted(to_onehot=C)``."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _like(class_indices(d[key]), d[key])
        return d


class RemapLabelsd(MapTransform):
    """Map the label values found in files to training class indices; mark ignored voxels.

    ``label`` (1, *spatial) of file values (e.g. BraTS {0, 1, 2, 4}, WMH 2017 {0, 1, 2}) becomes
    (1, *spatial) class indices via ``mapping``. Voxels whose file value is in ``ignore_values``
    (WMH 2017 label 2, other pathology; Kuijf et al., IEEE TMI 2019) become ``ignore_index``
    (default 0, i.e. background; e.g. -1 for losses and metrics that skip that value) and, when
    ``ignore_key`` is given, are flagged 1 in a mask of the same shape written there. A value that is neither mapped nor ignored stops with
    one line naming the file, since it means the data does not follow its registry entry.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mapping: Mapping[int | str, int],
        ignore_values: Sequence[int] = (),
        ignore_key: str | None = None,
        ignore_index: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapping = {int(k): int(v) for k, v in mapping.items()}
        self.ignore_values = [int(v) for v in ignore_values]
        self.ignore_key = ignore_key
        top = max([*self.mapping, *self.ignore_values, 0])
        self.lut = torch.full((top + 1,), 0, dtype=torch.long)
        self.known = torch.zeros(top + 1, dtype=torch.bool)
        for k, v in self.mapping.items():
            self.lut[k], self.known[k] = v, True
        for v in self.ignore_values:
            self.lut[v], self.known[v] = int(ignore_index), True

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            values = torch.as_tensor(img).round().long()
            bad = (values < 0) | (values >= len(self.lut))
            bad |= ~self.known[values.clamp(0, len(self.lut) - 1)]
            if bad.any():
                found = sorted({int(v) for v in torch.unique(values[bad])})
                raise DatasetError(
                    f"{_source(img, key)}: unexpected label values {found} (known: {sorted(self.mapping)})"
                )
            d[key] = _like(self.lut[values].to(torch.as_tensor(img).dtype), img)
            if self.ignore_key is not None:
                ignored = torch.isin(values, torch.tensor(self.ignore_values, dtype=torch.long))
                d[self.ignore_key] = _like(ignored.to(torch.float32), img)
        return d


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
        from PIL import Image

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
                    raise DatasetError(
                        f"{case}{path}: a {len(shape)}D image ({' x '.join(map(str, shape))}) where one "
                        f"{self.spatial_dims}D volume is expected (a cine or time series: one file per frame)"
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
        import numpy as np

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
    file (the registry's datalists and ``medseg_monai.bundle.channel_cases`` carry one per channel)."""

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


class BackgroundToZerod(MapTransform):
    """Shift each channel of ``keys`` (C, *spatial) by its minimum, so that the background of a
    skull-stripped volume (its lowest value) is 0 and ``CropForegroundd`` / ``NormalizeIntensityd
    (nonzero=True)`` find the brain. Raw scans (BraTS 2018: background 0) are unchanged; volumes
    z-scored before release (the BRATS 2015 four-class files: background about -3.6) get their
    background back to 0."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            t = torch.as_tensor(img)
            low = t.reshape(t.shape[0], -1).amin(dim=1).reshape(-1, *([1] * (t.ndim - 1)))
            d[key] = _like(t - low, img)
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


class MasksToLabeld(MapTransform):
    """Combine per-structure binary masks into one class-index label map.

    Input (M, *spatial): M stacked masks (any non-zero value is inside), e.g. the SCR masks of
    JSRT radiographs (van Ginneken et al., Med. Image Anal. 2006) in the registry's mask order.
    Output (1, *spatial): class ``i + 1`` where any mask in ``classes[i]`` is set, painted in
    order so that a later class wins where masks overlap (clavicles over lungs); 0 elsewhere.
    """

    def __init__(
        self, keys: KeysCollection, classes: Sequence[Sequence[int]], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.classes = [list(c) for c in classes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = torch.as_tensor(d[key])
            needed = max(i for c in self.classes for i in c) + 1
            if masks.shape[0] < needed:
                raise DatasetError(f"{_source(d[key], key)}: {masks.shape[0]} masks stacked, {needed} needed")
            label = torch.zeros((1, *masks.shape[1:]), dtype=torch.float32)
            for index, members in enumerate(self.classes, start=1):
                label[0][(masks[members] > 0).any(dim=0)] = index
            d[key] = _like(label, d[key])
        return d


class ResizeToMatchd(MapTransform):
    """Resize ``keys`` (C, *spatial) to the spatial size of ``reference_key`` (C', *spatial').

    For annotations stored at another resolution than their image, e.g. SCR masks at half the
    JSRT resolution (1024 vs 2048 pixels), and for predictions made at the network's size.
    ``mode="nearest"`` keeps labels labels. For annotations only a uniform rescale is meaningful,
    so an aspect-ratio mismatch above ``aspect_tolerance`` stops with one line naming the file;
    ``aspect_tolerance=None`` allows any rescale (a prediction back to its image's size).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str,
        mode: str = "nearest",
        aspect_tolerance: float | None = 0.02,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.mode = mode
        self.aspect_tolerance = aspect_tolerance

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        target = tuple(d[self.reference_key].shape[1:])
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape[1:])
            if shape == target:
                continue
            if len(shape) != len(target):
                raise DatasetError(
                    f"{_source(d[key], key)}: {len(shape)}-D, but its image is {len(target)}-D"
                )
            scales = [t / s for t, s in zip(target, shape, strict=True)]
            if self.aspect_tolerance is not None and max(scales) / min(scales) > 1 + self.aspect_tolerance:
                raise DatasetError(
                    f"{_source(d[key], key)}: size {shape} does not have the aspect ratio of its image {target}"
                )
            d[key] = Resize(spatial_size=target, mode=self.mode)(d[key])
        return d


class ScaleByBitDepthd(MapTransform):
    """Scale stored integer intensities to [0, 1] by their bit depth: x / (2**bits - 1).

    With ``bit_depth=None`` the depth is read from the loaded image's metadata (PIL mode "L"/"P"
    -> 8 bits, "I;16" -> 16; a dtype otherwise), so an 8-bit JSRT PNG and a 16-bit radiograph
    land on the same scale and a noise sigma given on the 16-bit scale means the same for both.
    """

    _MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 8, "I;16": 16, "I;16B": 16, "I;16L": 16}

    def __init__(
        self, keys: KeysCollection, bit_depth: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.bit_depth = bit_depth

    def _bits(self, img: Any, key: Hashable) -> int:
        if self.bit_depth is not None:
            return int(self.bit_depth)
        mode = (getattr(img, "meta", {}) or {}).get("mode")
        if mode in self._MODE_BITS:
            return self._MODE_BITS[mode]
        raise DatasetError(f"{_source(img, key)}: unknown bit depth (image mode {mode!r}); set bit_depth")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            scale = float(2 ** self._bits(d[key], key) - 1)
            d[key] = _like(torch.as_tensor(d[key]).float() / scale, d[key])
        return d


class LabelToRegionsd(MapTransform):
    """Class-index or file-value label (1, *spatial) -> binary region channels (R, *spatial).

    Channel r is 1 where the label is one of ``regions[r]``, e.g. BraTS whole tumour (1, 2, 4),
    tumour core (1, 4) and enhancing tumour (4) (Menze et al., IEEE TMI 2015). Generalises
    MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` (fixed to BraTS 2018 values) to any
    label convention, e.g. the 2015 set whose value 3 (non-enhancing) belongs to the core.
    """

    def __init__(
        self,
        keys: KeysCollection,
        regions: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.regions = [list(r) for r in (regions.values() if isinstance(regions, Mapping) else regions)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key]).round().long()[0]
            channels = [torch.isin(values, torch.tensor(r, dtype=torch.long)) for r in self.regions]
            d[key] = _like(torch.stack(channels).to(torch.float32), d[key])
        return d


class CaseGaussianNoised(MapTransform):
    """Add Gaussian noise to a fixed, seeded subset of cases; the same noise every epoch.

    The X-ray poster's noise experiments (Olander et al., DTU poster P28) add noise of standard
    deviation 5000 on the 16-bit scale to part of the images once, as a fixed noisy copy of the
    data. Here a case is noisy when a hash of (``seed``, case id) falls below ``fraction``, and its
    noise is drawn from a generator seeded by the same hash, so the choice and the noise are
    reproducible, do not depend on loading order, and survive caching.

    ``image`` (C, *spatial) must already be scaled to [0, 1] by its bit depth
    (:class:`ScaleByBitDepthd`); ``std`` is in those units, so sigma 5000 on the
    16-bit scale is ``std = 5000 / 65535`` whatever the stored bit depth. The result is clipped to
    [0, 1] as a 16-bit image saturates. Sets ``noisy`` (0 or 1) in the data dict.
    """

    def __init__(
        self,
        keys: KeysCollection,
        std: float,
        fraction: float = 1.0,
        seed: int = 0,
        id_key: str = "case_id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.std = float(std)
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.id_key = id_key

    def _draw(self, case_id: str) -> tuple[bool, int]:
        import hashlib

        digest = int.from_bytes(hashlib.sha256(f"{self.seed}:{case_id}".encode()).digest()[:8], "big")
        return digest / 2**64 < self.fraction, digest

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        noisy, digest = self._draw(str(d[self.id_key]))
        d["noisy"] = int(noisy and self.std > 0)
        if not d["noisy"]:
            return d
        generator = torch.Generator().manual_seed(digest % 2**63)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            noise = torch.randn(img.shape, generator=generator, dtype=torch.float32) * self.std
            d[key] = _like((img.float() + noise).clamp(0, 1), d[key])
        return d


class RandStoredRanged(RandomizableTransform, MapTransform):
    """Simulate an image stored with a narrow grey range: ``image`` in [0, 1] is mapped into a random
    part [o, o + w] of ``levels`` stored grey levels and rounded to them (posterised)::

        x' = round((o + w x) (levels - 1)) / (levels - 1),   w ~ U[min_width, 1],  o ~ U[0, 1 - w]

    Real archives hold radiographs whose stored values span a small part of their bit depth (JSRT
    images at 239-254 of 255, nearly white: issue #37); a network fed fixed bit-depth scaling sees
    them almost blank. Drawn before a per-image normalisation (e.g. MONAI's
    ``ScaleIntensityRangePercentilesd``), it teaches the network the posterised look such files
    have once their range is stretched back.

    Args:
        keys: (C, *spatial) images in [0, 1].
        prob: the probability of changing an image.
        min_width: the narrowest range drawn, as a fraction of the full scale (15 / 255 covers JSRT's).
        levels: stored grey levels (256 for 8 bits).
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        min_width: float = 15 / 255,
        levels: int = 256,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 < min_width <= 1 or levels < 2:
            raise ValueError(
                f"RandStoredRanged: min_width must be in (0, 1] and levels >= 2, got {min_width}, {levels}"
            )
        self.min_width = float(min_width)
        self.levels = int(levels)
        self.width, self.offset = 1.0, 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.width = float(self.R.uniform(self.min_width, 1.0))
        self.offset = float(self.R.uniform(0.0, 1.0 - self.width))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        top = self.levels - 1
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).float()
            d[key] = _like(torch.round((self.offset + self.width * img.clamp(0, 1)) * top) / top, d[key])
        return d


def _in_plane(size: int | float, slice_axis: int, ndim: int = 3) -> list[Any]:
    """``size`` on every spatial axis but ``slice_axis``, which keeps its own (-1)."""
    return [-1 if a == slice_axis else size for a in range(ndim)]


class SpatialPadSliceMinimumd(SpatialPadd):
    """Pad (C, X, Y, Z) images in the plane of the slices to ``spatial_size`` with each slice's
    own minimum, per channel (the WMH thesis, sec. 9.2: "The padding method was done using the
    minimum value in the slice instead of zeros after z-standardization, as zero's have a new
    meaning after standardization"). Symmetric, as ``SpatialPadd``, and invertible like it
    (``Invertd`` crops the padding off again); ``spatial_size`` -1 keeps an axis as it is.

    Args:
        keys: image keys.
        spatial_size: the padded size, e.g. ``[256, 256, -1]`` for axial slices.
        slice_axis: spatial axis along which the slices lie (2: axial after RAS orientation).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        slice_axis: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, spatial_size, mode="constant", allow_missing_keys=allow_missing_keys)
        self.slice_axis = slice_axis

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            plain = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            plane = tuple(1 + a for a in range(plain.ndim - 1) if a != self.slice_axis)
            low = plain.amin(dim=plane, keepdim=True)  # (C, 1, 1, Z) for axial slices
            # zero padding of (image - slice minimum), then the minimum back: the pad is the minimum
            d[key] = self.padder(img - low, mode="constant") + low
        return d


class InPlaneGridd(MapTransform, InvertibleTransform):
    """The WMH thesis's in-plane grid for 2D slices of (C, X, Y, Z) volumes (sec. 9.2): optional
    resampling to ``spacing`` mm in the plane (not in the thesis: for scans much finer than the
    ~1 mm it used, e.g. 512 x 512 clinical FLAIR at 0.47 mm), padding to ``size`` x ``size``
    with the slice minimum (images) or 0 (labels), centre crop of wider slices. No stretching:
    the voxels keep their aspect, unlike resizing. Invertible as a whole (``Invertd`` with this
    transform maps a prediction back to the volume's own grid, where metrics are computed).

    Args:
        image_keys: intensity images, padded with the slice minimum, resampled linearly.
        label_keys: labels, padded with 0, resampled nearest (none at evaluation: labels stay
            on their own grid).
        size: in-plane size in voxels (thesis: 256).
        slice_axis: spatial axis along which the slices lie (2: axial after RAS orientation).
        spacing: in-plane voxel size in mm, or None to keep the volume's own voxels (thesis).
        slice_spacing: distance between slices in mm, or None to keep them (thesis; a coarser
            one makes fewer slices, e.g. for quick checks).
    """

    def __init__(
        self,
        image_keys: KeysCollection,
        label_keys: KeysCollection = (),
        size: int = 256,
        slice_axis: int = 2,
        spacing: float | None = None,
        slice_spacing: float | None = None,
    ) -> None:
        images = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        labels = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        keys = [*images, *labels]
        steps: list[Any] = []
        if spacing is not None or slice_spacing is not None:
            pixdim = _in_plane(-1 if spacing is None else spacing, slice_axis)
            pixdim[slice_axis] = -1 if slice_spacing is None else slice_spacing
            steps.append(
                Spacingd(
                    keys,
                    pixdim=pixdim,
                    mode=["bilinear"] * len(images) + ["nearest"] * len(labels),
                )
            )
        steps.append(SpatialPadSliceMinimumd(images, _in_plane(size, slice_axis), slice_axis))
        if labels:
            steps.append(SpatialPadd(labels, _in_plane(size, slice_axis), mode="constant"))
        steps.append(CenterSpatialCropd(keys, _in_plane(size, slice_axis)))
        super().__init__(keys)
        # a Compose inside, not a Compose subclass: MONAI counts any Compose as random, and a
        # CacheDataset would then redo the grid (and copy the volume) on every access
        self.steps = Compose(steps)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.steps(data)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.steps.inverse(data)


class SplitByNearestLabeld(MapTransform):
    """Split a merged binary prediction (1, *spatial) into one channel per class (K, *spatial):
    each predicted voxel goes to the class of the nearest reference voxel among ``classes``.

    The knee thesis also trains one merged "bone" map (sec. 4.3.6); this scores such a model per
    bone wherever the reference separates them (``label_key``: class indices (1, *spatial)). A
    class absent from the reference gets an empty channel; with no class present all are empty.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        classes: Sequence[int] = (1, 2, 3),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.classes = [int(c) for c in classes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scipy import ndimage

        d = dict(data)
        label = torch.as_tensor(d[self.label_key]).detach().cpu().round().long().numpy()[0]
        inside = np.isin(label, self.classes)
        if inside.any():
            index = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
            nearest = torch.from_numpy(label[tuple(index)])
        else:
            nearest = torch.zeros(label.shape, dtype=torch.long)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key])
            if pred.shape[0] != 1 or pred.shape[1:] != nearest.shape:
                raise ValueError(
                    f"{key}: expected one merged map of shape {tuple(nearest.shape)}, got {tuple(pred.shape)}"
                )
            on = pred[0].detach().cpu() > 0.5
            split = torch.stack([(on & (nearest == c)) for c in self.classes]).to(torch.float32)
            d[key] = _like(split.to(pred.device), d[key])
        return d


class MapsToLabeld(MapTransform):
    """Per-structure probability maps (C, *spatial) -> a label map (1, *spatial) of file values:
    ``values[c]`` where map c is the highest and at least ``threshold``, 0 elsewhere (sigmoid maps
    may overlap; the most probable structure wins)."""

    def __init__(
        self,
        keys: KeysCollection,
        values: Sequence[int],
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.values = [int(v) for v in values]
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            maps = torch.as_tensor(d[key]).float()
            if maps.shape[0] != len(self.values):
                raise ValueError(
                    f"{key}: {maps.shape[0]} maps for {len(self.values)} label values {self.values}"
                )
            best, index = maps.max(dim=0)
            lut = torch.tensor(self.values, dtype=torch.float32, device=maps.device)
            label = torch.where(best >= self.threshold, lut[index], torch.zeros_like(best))
            d[key] = _like(label[None], d[key])
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
