"""N4 bias-field correction (Tustison et al., IEEE TMI 29(6):1310-1320, 2010) through SimpleITK, as a
MONAI dictionary transform with an optional on-disk cache so that a volume is corrected once."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medseg_monai.transforms import _like

__all__ = ["N4BiasFieldCorrectiond", "n4_bias_field"]

logger = logging.getLogger(__name__)

# an axis is shrunk only while this many voxels remain (the 36 thick coronal slices of a knee are not)
_MIN_SHRUNK_SIZE = 32


def n4_bias_field(
    image: np.ndarray,
    spacing: Sequence[float],
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 50, 50),
    convergence_threshold: float = 0.001,
) -> np.ndarray:
    """The multiplicative bias field of a 3D MR ``image`` (X, Y, Z) with voxel ``spacing`` in mm.

    ITK's ``N4BiasFieldCorrectionImageFilter`` (through SimpleITK) fits the log field as a B-spline
    on a copy shrunk by ``shrink_factor`` (along axes that keep at least 32 voxels), with one
    fitting level per entry of ``iterations`` (their maximum iterations), inside the Otsu
    foreground mask, the usual recipe of ITK's and SimpleITK's N4 examples. The fitted field is
    evaluated on the shrunk grid and linearly resampled to the full grid. Divide the image by the
    result. SimpleITK rather than the ``itk`` package: the same filter, but ``itk`` loads its
    wrappers lazily, 12-14 s on a process's first N4 on this CPU, against 0.2 s.
    """
    import SimpleITK as sitk  # only when a bundle corrects bias

    arr = np.ascontiguousarray(np.asarray(image, dtype=np.float32))
    if arr.ndim != 3:
        raise ValueError(f"N4 needs one 3D volume, got shape {arr.shape}")
    # ITK indexes arrays in reverse (its x is numpy's last axis)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in reversed(tuple(spacing))])
    mask = sitk.OtsuThreshold(img, 0, 1)  # inside (below the threshold) 0, foreground 1
    factors = [max(1, min(int(shrink_factor), n // _MIN_SHRUNK_SIZE)) for n in reversed(arr.shape)]
    small, small_mask = sitk.Shrink(img, factors), sitk.Shrink(mask, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])  # one fitting level per entry
    n4.SetConvergenceThreshold(float(convergence_threshold))
    n4.Execute(small, small_mask)
    log_full = sitk.Resample(n4.GetLogBiasFieldAsImage(small), img, sitk.Transform(), sitk.sitkLinear)
    return np.exp(sitk.GetArrayFromImage(log_full)).astype(np.float32)


class N4BiasFieldCorrectiond(MapTransform):
    """Divide each image of ``keys`` (1, X, Y, Z) by its N4 bias field (:func:`n4_bias_field`).

    The knee thesis corrects bias with N4 before scaling intensities to [0, 1] (sec. 4.3.2). N4
    takes seconds to a minute per volume, so with ``cache_dir`` the corrected volume is stored
    under a hash of the voxels, spacing and settings and read back on the next call (the next
    run, evaluation or experiment of the grid); without it, only MONAI's ``CacheDataset`` keeps
    the result, for one run. Non-positive voxels are left as they are (N4 works on the log).
    """

    def __init__(
        self,
        keys: KeysCollection,
        shrink_factor: int = 4,
        iterations: Sequence[int] = (50, 50, 50, 50),
        convergence_threshold: float = 0.001,
        cache_dir: str | os.PathLike | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(shrink_factor) < 1 or not iterations or min(int(i) for i in iterations) < 1:
            raise ValueError(
                f"N4 needs shrink_factor >= 1 and positive iterations per level, got {shrink_factor}, {list(iterations)}"
            )
        self.settings = {
            "shrink_factor": int(shrink_factor),
            "iterations": [int(i) for i in iterations],
            "convergence_threshold": float(convergence_threshold),
        }
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _cache_path(self, arr: np.ndarray, spacing: Sequence[float]) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha256(arr.tobytes())
        # "SimpleITK": volumes corrected through the itk package before differ by up to a few %
        key = (arr.shape, [round(float(s), 6) for s in spacing], self.settings, "SimpleITK")
        h.update(repr(key).encode())
        return self.cache_dir / f"{h.hexdigest()[:32]}.npy"

    def correct(self, arr: np.ndarray, spacing: Sequence[float], name: str = "volume") -> np.ndarray:
        """``arr`` (X, Y, Z) divided by its bias field, through the cache when there is one."""
        path = self._cache_path(arr, spacing)
        if path is not None and path.is_file():
            return np.load(path)
        start = time.perf_counter()
        out = np.where(arr > 0, arr / n4_bias_field(arr, spacing, **self.settings), arr).astype(np.float32)
        # a line per volume: a first run over a large data set spends minutes here before epoch 1
        logger.info("N4 bias-field correction of %s %s: %.1f s", name, arr.shape, time.perf_counter() - start)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, out)
            os.replace(tmp, path)  # atomic: parallel jobs never read a half-written file
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spacing = [float(s) for s in getattr(img, "pixdim", [1.0, 1.0, 1.0])]  # after Orientationd
            arr = torch.as_tensor(img).detach().cpu().numpy().astype(np.float32)
            if arr.ndim != 4 or arr.shape[0] != 1:
                raise ValueError(f"{key}: N4 corrects one-channel 3D volumes (1, X, Y, Z), got {arr.shape}")
            meta = getattr(img, "meta", {}) or {}
            name = os.path.basename(str(meta.get("filename_or_obj", key)))
            corrected = torch.from_numpy(self.correct(arr[0], spacing, name))[None]
            d[key] = _like(corrected, img)
        return d
