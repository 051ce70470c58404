"""The femur-tibia joint centre of a coronal knee MR, found from the image alone, and the square
in-plane window around it that the knee thesis crops (sec. 4.3.1: "An algorithm was used to detect
the center where Tibia and Femur meet and only use a square window around this point. There was no
cropping applied on the z-axis."). The thesis does not give its algorithm; this is ours.

Arrays are (X, S, Z) after ``Orientationd(axcodes="RSP")``: left-right, inferior-superior, and the
coronal slice axis. In a coronal slice the joint is a dark horizontal band (cortex, cartilage and
the joint space, about a centimetre) between the bright marrow of the femoral condyles above and
of the tibial plateau below; the growth plates are thinner bands inside the bones.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForegroundd, MapTransform
from scipy import ndimage

__all__ = ["JointWindowCropd", "RecropToWindowd", "joint_centre", "reference_joint_centre"]


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
            src = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            out = src.new_zeros((src.shape[0], int(size[0]), int(size[1]), src.shape[3]))
            # the overlap of the target window [offset, offset + size) with the source [0, shape)
            lo = np.maximum(offset, 0)
            hi = np.minimum(offset + size, src.shape[1:3])
            if (hi > lo).all():
                a, b = lo - offset, hi - offset
                out[:, a[0] : b[0], a[1] : b[1]] = src[:, lo[0] : hi[0], lo[1] : hi[1]]
            d[key] = out
        return d
