"""Slices of loaded volumes as single items: the 2.5D training data set of the WMH thesis (its
transforms, :class:`~medseg_monai.transforms.ExtractSlicesd` and the neighbour stacks, are in
:mod:`medseg_monai.transforms.slices`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.data import Dataset

from medseg_monai.data.registry import DatasetError
from medseg_monai.transforms.slices import ExtractSlicesd

__all__ = ["SliceDataset"]


class SliceDataset(Dataset):
    """Slices of loaded volumes as single items, for training on slices shuffled across volumes.

    The thesis trains on mini-batches of 12 random slices (sec. 7.6) from volumes of 40-300
    slices. At construction every (volume, slice) pair that :class:`ExtractSlicesd` keeps
    (``min_entropy`` for training) is indexed once (``self.index``); item i is that one slice
    sample, after ``transform`` (per-slice augmentation, e.g. random flips), so
    ``DataLoader(ds, batch_size=12, shuffle=True)`` draws slices across volumes.

    Args:
        volumes: loaded volume dicts (``image`` (C, X, Y, Z), ``label`` (1, X, Y, Z), ...), e.g. a
            list, or a MONAI ``CacheDataset`` whose transforms are all deterministic. Item v is
            read once per slice drawn and never written to; a CacheDataset with random
            transforms would re-run (and deep-copy for) them on every slice.
        transform: per-slice transform (a callable or a sequence, composed as in MONAI's Dataset).
        keys, centre_keys, axis, neighbours, min_entropy, **extract_args: as in
            :class:`ExtractSlicesd`, which does the slicing.
    """

    def __init__(
        self,
        volumes: Sequence[Mapping[Hashable, Any]],
        keys: KeysCollection = "image",
        centre_keys: KeysCollection = "label",
        axis: int = -1,
        neighbours: int = 3,
        min_entropy: float | None = None,
        transform: Callable | Sequence[Callable] | None = None,
        **extract_args: Any,
    ) -> None:
        self.volumes = volumes
        self.extractor = ExtractSlicesd(keys, centre_keys, axis, neighbours, min_entropy, **extract_args)
        index = [(v, z) for v in range(len(volumes)) for z in self.extractor.slice_indices(volumes[v])]
        if len(volumes) and not index:
            # else the DataLoader's sampler fails later with "num_samples=0", naming nothing
            raise DatasetError(
                f"no training slice: all slices of the {len(volumes)} volume(s) have a histogram entropy "
                f"below min_entropy {min_entropy} bits (lower --min_entropy, or check the images)"
            )
        super().__init__(data=index, transform=transform)
        self.index: list[tuple[int, int]] = index

    def _transform(self, index: int) -> Any:
        v, z = self.index[index]
        sample = self.extractor.extract(self.volumes[v], [z])[0]
        return self.transform(sample)
