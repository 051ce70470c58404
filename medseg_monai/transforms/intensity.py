"""Intensity transforms: background to zero, scaling by bit depth, the X-ray poster's fixed noisy
cases, a simulated narrow stored grey range, and N4 bias-field correction (Tustison et al., IEEE
TMI 29(6):1310-1320, 2010) through SimpleITK with an optional on-disk cache so that a volume is
corrected once."""

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
from monai.transforms import MapTransform, RandomizableTransform

from medseg_monai.data.registry import DatasetError
from medseg_monai.transforms.utils import source_name, with_meta_of

__all__ = [
    "BackgroundToZerod",
    "CaseGaussianNoised",
    "N4BiasFieldCorrectiond",
    "RandStoredRanged",
    "ScaleByBitDepthd",
    "n4_bias_field",
]

logger = logging.getLogger(__name__)


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
            d[key] = with_meta_of(t - low, img)
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
        raise DatasetError(f"{source_name(img, key)}: unknown bit depth (image mode {mode!r}); set bit_depth")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            scale = float(2 ** self._bits(d[key], key) - 1)
            d[key] = with_meta_of(torch.as_tensor(d[key]).float() / scale, d[key])
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
            d[key] = with_meta_of((img.float() + noise).clamp(0, 1), d[key])
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
            d[key] = with_meta_of(
                torch.round((self.offset + self.width * img.clamp(0, 1)) * top) / top, d[key]
            )
        return d


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
            d[key] = with_meta_of(corrected, img)
        return d
