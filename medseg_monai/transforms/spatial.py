"""Spatial transforms: resizing to a reference, the WMH thesis's in-plane grid for 2D slices, and
the knee thesis's window around the femur-tibia joint.

The joint centre of a coronal knee MR is found from the image alone, and the thesis crops a square
in-plane window around it (sec. 4.3.1: "An algorithm was used to detect the center where Tibia and
Femur meet and only use a square window around this point. There was no cropping applied on the
z-axis."). The thesis does not give its algorithm; :func:`joint_centre` is ours. Its arrays are
(X, S, Z) after ``Orientationd(axcodes="RSP")``: left-right, inferior-superior, and the coronal
slice axis. In a coronal slice the joint is a dark horizontal band (cortex, cartilage and the joint
space, about a centimetre) between the bright marrow of the femoral condyles above and of the
tibial plateau below; the growth plates are thinner bands inside the bones.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    InvertibleTransform,
    MapTransform,
    Resize,
    Spacingd,
    SpatialPadd,
)
from scipy import ndimage

from medseg_monai.data.registry import DatasetError
from medseg_monai.transforms.utils import plain_tensor, source_name

__all__ = [
    "InPlaneGridd",
    "JointWindowCropd",
    "RecropToWindowd",
    "ResizeToMatchd",
    "SpatialPadSliceMinimumd",
    "joint_centre",
    "reference_joint_centre",
]


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
                    f"{source_name(d[key], key)}: {len(shape)}-D, but its image is {len(target)}-D"
                )
            scales = [t / s for t, s in zip(target, shape, strict=True)]
            if self.aspect_tolerance is not None and max(scales) / min(scales) > 1 + self.aspect_tolerance:
                raise DatasetError(
                    f"{source_name(d[key], key)}: size {shape} does not have the aspect ratio of its image {target}"
                )
            d[key] = Resize(spatial_size=target, mode=self.mode)(d[key])
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
            plain = plain_tensor(img)
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


def joint_centre(
    image: np.ndarray,
    spacing: Sequence[float],
    band_mm: float = 25.0,
    search_mm: float = 12.0,
    smooth_mm: float = 2.0,
) -> tuple[float, float]:
    """(x, s) voxel coordinates of the femur-tibia joint centre in ``image`` (X, S, Z).

    1. x: the middle of the limb, the columns where at least half as much tissue (above 15 % of
       the 99.5th-percentile intensity) lies as in the fullest column.
    2. s: the mean intensity of the central ``band_mm`` either side of x over all slices gives a
       profile along S, smoothed with a ``smooth_mm`` Gaussian. The joint is the deepest valley:
       the row whose value lies furthest below the lower of the brightest rows within
       ``search_mm`` above and below it (condyles above, plateau below).
    """
    v = np.asarray(image, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"joint_centre needs one (X, S, Z) volume, got shape {v.shape}")
    sx, ss = float(spacing[0]), float(spacing[1])
    lo, hi = float(v.min()), float(np.percentile(v, 99.5))
    v = (v - lo) / max(hi - lo, 1e-6)
    tissue = (v > 0.15).mean(axis=(1, 2))
    columns = np.flatnonzero(tissue >= 0.5 * tissue.max())
    if columns.size == 0 or tissue.max() == 0:
        raise ValueError("joint_centre: the image has no tissue above 15 % of its bright end")
    x = (columns[0] + columns[-1]) / 2.0
    half = max(1, round(band_mm / sx))
    band = v[max(0, int(x) - half) : int(x) + half + 1]
    profile = ndimage.gaussian_filter1d(band.mean(axis=(0, 2)), max(smooth_mm / ss, 0.5))
    reach = max(1, round(search_mm / ss))
    n = profile.size
    if n <= 2 * reach:
        return x, (n - 1) / 2.0
    depth = np.full(n, -np.inf)
    for s in range(reach, n - reach):
        depth[s] = min(profile[s - reach : s].max(), profile[s + 1 : s + reach + 1].max()) - profile[s]
    return x, float(np.argmax(depth))


def reference_joint_centre(label: np.ndarray, femur: int = 1, tibia: int = 2) -> tuple[float, float]:
    """(x, s) of the joint centre from a label map (X, S, Z): s is the median over the columns
    holding both bones of the midpoint between the femur's lowest and the tibia's highest voxel,
    x the middle of those columns. The reference :func:`joint_centre` is measured against."""
    lab = np.asarray(label)
    fem, tib = (lab == femur).any(axis=2), (lab == tibia).any(axis=2)
    xs, mids = [], []
    for x in range(lab.shape[0]):
        f, t = np.flatnonzero(fem[x]), np.flatnonzero(tib[x])
        if f.size and t.size:
            xs.append(x)
            mids.append((f.min() + t.max()) / 2.0)
    if not xs:
        raise ValueError("reference_joint_centre: no column holds both femur and tibia")
    return (xs[0] + xs[-1]) / 2.0, float(np.median(mids))


class _JointCentreSelect:
    """``select_fn`` for MONAI's bounding box: True on the 1 or 2 in-plane voxels at the joint
    centre (2 for an even window, so that the box is exactly the window) across all slices."""

    def __init__(self, window: Sequence[int], **kwargs: float) -> None:
        self.window = [int(w) for w in window]
        self.kwargs = kwargs

    def __call__(self, img: Any) -> torch.Tensor:
        arr = torch.as_tensor(img).detach().cpu().float().numpy()
        spacing = [float(s) for s in getattr(img, "pixdim", [1.0] * (arr.ndim - 1))]
        x, s = joint_centre(arr[0], spacing, **self.kwargs)
        mask = torch.zeros(arr.shape, dtype=torch.bool)
        starts = [int(np.floor(c - (1 - w % 2) / 2.0)) for c, w in zip((x, s), self.window, strict=True)]
        widths = [2 - w % 2 for w in self.window]
        sx, ss = (slice(max(0, a), max(0, a) + b) for a, b in zip(starts, widths, strict=True))
        mask[:, sx, ss, :] = True
        return mask


class JointWindowCropd(CropForegroundd):
    """Crop (and pad where it leaves the image) a ``window`` = (wx, ws) voxel square in-plane
    around the joint centre of ``source_key`` (1, X, S, Z), every slice kept: the thesis's crop
    (sec. 4.3.1). Resample in-plane first (``Spacingd``) so that the window has a fixed size in
    mm. MONAI's ``CropForegroundd`` does the cropping, so ``Invertd`` puts a prediction back; the
    window's start and end in voxels (X, S, Z of the resampled grid, negative where it pads) are
    stored as ``start_coord_key`` / ``end_coord_key``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: Hashable = "image",
        window: Sequence[int] = (224, 224),
        band_mm: float = 25.0,
        search_mm: float = 12.0,
        smooth_mm: float = 2.0,
        mode: str | Sequence[str] = "constant",
        start_coord_key: str = "joint_window_start",
        end_coord_key: str = "joint_window_end",
        allow_missing_keys: bool = False,
    ) -> None:
        win = [int(w) for w in window]
        if len(win) != 2 or min(win) < 1:
            raise ValueError(
                f"window must be two positive in-plane sizes (x, s) in voxels, got {list(window)}"
            )
        margin = [(w - (2 - w % 2)) // 2 for w in win] + [0]
        super().__init__(
            keys,
            source_key=str(source_key),
            select_fn=_JointCentreSelect(win, band_mm=band_mm, search_mm=search_mm, smooth_mm=smooth_mm),
            margin=margin,
            allow_smaller=False,
            mode=mode,
            start_coord_key=start_coord_key,
            end_coord_key=end_coord_key,
            allow_missing_keys=allow_missing_keys,
        )


class RecropToWindowd(MapTransform):
    """Move arrays (C, X, S, Z) predicted on one joint window to another window of the same
    resampled grid: the part inside both is kept, the rest of the target window is zero (never
    predicted). The windows are the boxes :class:`JointWindowCropd` stored under ``from_*`` and
    ``to_*`` keys; Z is kept as it is (no z crop, both resized alike).

    The knee bundle predicts on the ``infer_window_mm`` window and scores the thesis's figure on
    the ``window_mm`` one, the window it trained on (the same when both are 100 mm).
    """

    def __init__(
        self,
        keys: KeysCollection,
        from_start_key: str = "joint_window_start",
        to_start_key: str = "thesis_window_start",
        to_end_key: str = "thesis_window_end",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.from_start_key, self.to_start_key, self.to_end_key = from_start_key, to_start_key, to_end_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)

        def in_plane(key: str) -> np.ndarray:  # a stored box corner, (x, s)
            return np.asarray(torch.as_tensor(d[key]).cpu()).reshape(-1)[:2].astype(int)

        start = in_plane(self.to_start_key)
        offset, size = start - in_plane(self.from_start_key), in_plane(self.to_end_key) - start
        for key in self.key_iterator(d):
            src = plain_tensor(d[key])
            out = src.new_zeros((src.shape[0], int(size[0]), int(size[1]), src.shape[3]))
            # the overlap of the target window [offset, offset + size) with the source [0, shape)
            lo = np.maximum(offset, 0)
            hi = np.minimum(offset + size, src.shape[1:3])
            if (hi > lo).all():
                a, b = lo - offset, hi - offset
                out[:, a[0] : b[0], a[1] : b[1]] = src[:, lo[0] : hi[0], lo[1] : hi[1]]
            d[key] = out
        return d
