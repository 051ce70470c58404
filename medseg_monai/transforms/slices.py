"""2.5D transforms: slices of 3D volumes with their neighbours as channels.

The WMH thesis (Røvang 2021) trains a 2D U-Net on slices of FLAIR (and T1) volumes, with the
slice and its neighbours stacked as channels to predict the centre slice ("3 slices as
channels", sec. 6.3, Fig. 6.5), keeps training slices whose entropy is at least 2 bits (sec. 7.2)
and predicts a volume by running the 2D network on consecutive slices and restacking (sec. 7.4,
Fig. 7.4). The pieces:

- :func:`slice_entropy`: Shannon entropy of a slice's intensity histogram (eq. 7.2).
- :func:`stack_neighbours`: the one place that builds (C*k, ...) neighbour stacks, shared by
  :class:`ExtractSlicesd`, :class:`~medseg_monai.data.slices.SliceDataset` and
  :class:`~medseg_monai.inferers.NeighbourSliceInferer`.
- :class:`ExtractSlicesd`: volume dict -> list of slice dicts (a multi-sample transform, like
  MONAI's ``RandCropByPosNegLabeld``), optionally dropping low-entropy slices.
- :class:`EntropySliceFilterd`: the entropy filter on a list of slice samples.
- :class:`~medseg_monai.data.slices.SliceDataset` (a data set, not a transform): every kept
  (volume, slice) pair of loaded volumes as one item, so a ``DataLoader(shuffle=True,
  batch_size=12)`` shuffles slices across volumes (sec. 7.6).
- :class:`~medseg_monai.inferers.NeighbourSliceInferer` (an inferer): 2.5D inference over a volume.

Per-volume z-scoring is MONAI's ``NormalizeIntensityd(keys="image", channel_wise=True)``; the
thesis standardises over the whole volume (eq. 5.1), i.e. ``nonzero=False``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple

from medseg_monai.transforms.utils import plain_tensor

try:
    from monai.transforms.traits import MultiSampleTrait, ReduceTrait
except ImportError:  # older MONAI: Compose maps every transform over a list of samples

    class MultiSampleTrait:  # type: ignore[no-redef]
        pass

    class ReduceTrait:  # type: ignore[no-redef]
        pass


__all__ = [
    "EntropySliceFilterd",
    "ExtractSlicesd",
    "neighbour_indices",
    "slice_entropy",
    "spatial_axis",
    "stack_neighbours",
]


def _entropies(rows: np.ndarray, bins: int, value_range: tuple[float, float] | None) -> np.ndarray:
    """Entropy in bits of each row of ``rows`` (R, N), all rows binned on one grid."""
    rows = np.asarray(rows)
    lo, hi = value_range if value_range is not None else (float(rows.min()), float(rows.max()))
    if not hi > lo:  # a single intensity level carries no information
        return np.zeros(rows.shape[0])
    scale = bins / (hi - lo)
    out = np.empty(rows.shape[0])
    for i, row in enumerate(rows):
        # bins equal-width bins over [lo, hi], hi in the last one (np.histogram's convention)
        q = np.clip(((row.astype(np.float64) - lo) * scale).astype(np.int64), 0, bins - 1)
        p = np.bincount(q, minlength=bins) / row.size
        p = p[p > 0]
        out[i] = 0.0 - (p * np.log2(p)).sum()  # 0.0, not -0.0, for one level
    return out


def slice_entropy(
    slice_: np.ndarray | torch.Tensor, bins: int = 256, value_range: tuple[float, float] | None = None
) -> float:
    """Shannon entropy in bits of a slice's intensity histogram: H = -sum_k p_k log2 p_k (eq. 7.2).

    The intensities are binned into ``bins`` equal-width levels over ``value_range`` (values
    outside it are clipped into the end bins), by default the slice's own [min, max]. With the
    thesis's 8-bit volumes, 256 levels are its L intensity levels. A constant slice is 0 bits,
    two equally frequent levels 1 bit, 256 equally frequent levels 8 bits. Any shape; NaNs are
    not allowed.
    """
    values = slice_.detach().cpu().numpy() if isinstance(slice_, torch.Tensor) else np.asarray(slice_)
    return float(_entropies(values.reshape(1, -1), bins, value_range)[0])


def spatial_axis(axis: int) -> int:
    """A spatial axis of a 3D volume (0, 1, 2, or -3..-1 from the end) as 0, 1 or 2."""
    if not -3 <= axis <= 2:
        raise ValueError(f"axis is a spatial axis of a 3D volume (0, 1, 2 or -3..-1), got {axis}")
    return axis % 3


def neighbour_indices(n_slices: int, centres: Sequence[int] | torch.Tensor, neighbours: int) -> torch.Tensor:
    """(len(centres), k) slice indices z - k//2 .. z + k//2 for each centre z, clamped to
    [0, n_slices - 1]: beyond the volume's edge the edge slice is repeated."""
    if neighbours < 1 or neighbours % 2 == 0:
        raise ValueError(f"neighbours must be odd and positive, got {neighbours}")
    offsets = torch.arange(neighbours) - neighbours // 2
    centres = torch.as_tensor(centres, dtype=torch.long).reshape(-1, 1)
    return (centres + offsets).clamp(0, n_slices - 1)


def stack_neighbours(
    volume: torch.Tensor, centres: Sequence[int] | torch.Tensor, axis: int = -1, neighbours: int = 3
) -> torch.Tensor:
    """Neighbour-slice stacks of a volume, the 2.5D input of the thesis (sec. 6.3, Fig. 6.5).

    Args:
        volume: (*lead, C, S0, S1, S2), e.g. an image (C, X, Y, Z) or a batch (B, C, X, Y, Z).
        centres: indices of the centre slices along ``axis``.
        axis: spatial axis to slice along (0, 1, 2 or negative; -1 = the last spatial axis).
        neighbours: k, odd: the centre slice and k // 2 slices on each side, edge slices repeated
            past the volume's ends.

    Returns:
        (len(centres), *lead, C * k, A, B), A and B the other two spatial axes in order; channel
        c * k + j is input channel c at slice z - k//2 + j (FLAIR x3 then T1 x3 for two channels).
    """
    dim = volume.ndim - 3 + spatial_axis(axis)
    index = neighbour_indices(volume.shape[dim], centres, neighbours).to(volume.device)
    stacks = volume.movedim(dim, 0)[index]  # (n, k, *lead, C, A, B)
    return stacks.movedim(1, -3).flatten(-4, -3)  # (n, *lead, C * k, A, B)


class ExtractSlicesd(MapTransform, MultiSampleTrait):
    """Split a volume dict into one dict per slice, each slice stacked with its neighbours.

    ``keys`` (e.g. ``image`` (C, X, Y, Z)) become (C * k, X, Y) neighbour stacks
    (:func:`stack_neighbours`: for each input channel, slices z - k//2 .. z + k//2; the edge slice
    is repeated past the volume's ends); ``centre_keys`` (e.g. ``label`` (1, X, Y, Z), an ignore
    mask) become their centre slice (1, X, Y). ``axis`` is the spatial axis sliced along (the last
    by default: axial for RAS volumes). Each sample gets ``slice_index_key`` (z) and keeps the
    volume's other entries (case_id, ...) by reference, so every volume-shaped entry should be
    listed in ``keys`` or ``centre_keys``. Outputs are plain tensors: a slice does not share its
    volume's affine.

    With ``min_entropy`` (2 bits in the thesis, sec. 7.2; for training only) slices whose centre
    slice of the first key's ``entropy_channel`` has a lower :func:`slice_entropy` are dropped.
    The thesis does not say how it binned; its volumes were 8-bit (sec. 5.4), whose 256 levels
    are fixed per volume, so by default the histogram has ``entropy_bins`` bins over the whole
    volume's range of that channel (``entropy_range="volume"``, unchanged by per-volume
    z-scoring); ``"slice"`` bins over each slice's own range.

    Returns a list of dicts; MONAI's ``list_data_collate`` flattens such lists into a batch.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        centre_keys: KeysCollection = "label",
        axis: int = -1,
        neighbours: int = 3,
        min_entropy: float | None = None,
        entropy_channel: int = 0,
        entropy_bins: int = 256,
        entropy_range: str = "volume",
        slice_index_key: str = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.centre_keys: tuple[Hashable, ...] = ensure_tuple(centre_keys)
        self.axis = spatial_axis(axis)
        neighbour_indices(1, [0], neighbours)  # validates k
        self.neighbours = neighbours
        self.min_entropy = min_entropy
        self.entropy_channel = entropy_channel
        self.entropy_bins = entropy_bins
        if entropy_range not in ("volume", "slice"):
            raise ValueError(f"entropy_range must be 'volume' or 'slice', got {entropy_range!r}")
        self.entropy_range = entropy_range
        self.slice_index_key = slice_index_key

    def _centre_keys(self, d: Mapping[Hashable, Any]) -> list[Hashable]:
        missing = [k for k in self.centre_keys if k not in d]
        if missing and not self.allow_missing_keys:
            raise KeyError(f"ExtractSlicesd: keys {missing} not in the data (allow_missing_keys=False)")
        return [k for k in self.centre_keys if k in d]

    def _first_key(self, d: Mapping[Hashable, Any]) -> Hashable:
        for key in self.key_iterator(dict(d)):
            return key
        raise KeyError(f"ExtractSlicesd: none of {list(self.keys)} in the data")

    def entropies(self, data: Mapping[Hashable, Any]) -> np.ndarray:
        """Entropy of every slice of the first key's ``entropy_channel`` (S,)."""
        key = self._first_key(data)
        channel = plain_tensor(data[key])[self.entropy_channel].movedim(self.axis, 0).float()
        rows = channel.reshape(channel.shape[0], -1).cpu().numpy()
        value_range = (float(rows.min()), float(rows.max())) if self.entropy_range == "volume" else None
        if value_range is not None:
            return _entropies(rows, self.entropy_bins, value_range)
        return np.array([slice_entropy(r, self.entropy_bins) for r in rows])

    def slice_indices(self, data: Mapping[Hashable, Any]) -> list[int]:
        """The slices of ``data`` this transform returns, in order."""
        key = self._first_key(data)
        n = plain_tensor(data[key]).shape[1 + self.axis]
        if self.min_entropy is None:
            return list(range(n))
        return [int(z) for z in np.flatnonzero(self.entropies(data) >= self.min_entropy)]

    def extract(self, data: Mapping[Hashable, Any], indices: Sequence[int]) -> list[dict[Hashable, Any]]:
        """One sample per slice index in ``indices`` (no entropy filtering)."""
        d = dict(data)
        samples: list[dict[Hashable, Any]] = [dict(d) for _ in indices]
        for key in self.key_iterator(d):
            stacks = stack_neighbours(plain_tensor(d[key]), indices, self.axis, self.neighbours)
            for sample, stack in zip(samples, stacks, strict=True):
                sample[key] = stack
        for key in self._centre_keys(d):
            slices = stack_neighbours(plain_tensor(d[key]), indices, self.axis, 1)
            for sample, slice_ in zip(samples, slices, strict=True):
                sample[key] = slice_
        for sample, z in zip(samples, indices, strict=True):
            sample[self.slice_index_key] = int(z)
        return samples

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:  # type: ignore[override]
        return self.extract(data, self.slice_indices(data))


class EntropySliceFilterd(Transform, ReduceTrait):
    """Keep the slice samples whose image slice has at least ``min_entropy`` bits (sec. 7.2).

    Takes the list of samples from :class:`ExtractSlicesd` (or one sample) and returns the list
    of those kept, so it can follow ExtractSlicesd in a ``Compose``: as a ``ReduceTrait``
    transform it receives the whole list rather than one sample at a time. The entropy is that of
    input channel ``channel`` at the centre slice: stacked channel ``channel * k + k // 2`` of
    samples with ``neighbours`` = k, binned over the slice's own range unless ``value_range`` is
    given. ExtractSlicesd's ``min_entropy`` does the same before stacking and bins over the
    volume's range; use one or the other.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        min_entropy: float = 2.0,
        channel: int = 0,
        neighbours: int = 1,
        bins: int = 256,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        self.key = ensure_tuple(keys)[0]
        self.min_entropy = min_entropy
        neighbour_indices(1, [0], neighbours)  # validates k
        self.channel = channel * neighbours + neighbours // 2
        self.bins = bins
        self.value_range = value_range

    def keeps(self, sample: Mapping[Hashable, Any]) -> bool:
        image = plain_tensor(sample[self.key])[self.channel]
        return slice_entropy(image, self.bins, self.value_range) >= self.min_entropy

    def __call__(
        self, data: Mapping[Hashable, Any] | Sequence[Mapping[Hashable, Any]]
    ) -> list[Mapping[Hashable, Any]]:
        samples = [data] if isinstance(data, Mapping) else list(data)
        return [s for s in samples if self.keeps(s)]
