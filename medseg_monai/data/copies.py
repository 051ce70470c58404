"""Augmented copies *added* to a data set, next to its untouched originals.

Two of the studies enlarge their training data this way instead of augmenting on the fly:

- the X-ray poster (Olander et al., DTU poster P28, "Experiment 2: Noisy Images Addition" and
  "Experiment 3"): the training data are the original images *and* newly transformed noisy copies
  of them, and the validation data 60 original images + 60 noisy copies;
- the WMH thesis (Røvang 2021, sec. 8.6 "Robustification of best result"): 300 random slices of
  each 12-patient chunk are added as randomly flipped copies (9421 -> 11221 training slices).

Both generated their copies once, so a copy is the same in every epoch here too (``fixed=True``).

:class:`AddedCopiesDataset` wraps a data set (a list of data dicts or any indexable data set,
e.g. a MONAI ``CacheDataset``); :func:`added_copies` is the same on a datalist, for copies that
a cached pipeline then transforms (:class:`medseg_monai.transforms.OnCopiesd` applies a transform
to the copies only).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable

from medseg_monai.deprecation import moved_names

__all__ = ["AddedCopiesDataset", "added_copies"]


def _copy_seed(seed: int, index: int) -> int:
    """A 32-bit seed for copy ``index`` of a data set seeded with ``seed`` (independent streams:
    seed 0's copy 1 does not share its noise with seed 1's copy 0)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(index)]).generate_state(1)[0])


class AddedCopiesDataset(torch.utils.data.Dataset):
    """The items of ``data`` followed by transformed copies of some of them.

    Items ``0 .. len(data) - 1`` are the originals, returned as ``data`` returns them (the same
    object: nothing is copied or changed, unless ``mark_key`` is set, then a shallow copy with
    ``mark_key: 0``). Items ``len(data) ..`` are copies of ``count`` (default ``round(fraction *
    len(data))``) distinct originals, chosen with ``seed`` (all of them, in order, when the count
    is ``len(data)``; otherwise a seeded random choice, in index order). A copy is a deep copy of
    its original (so a transform that changes arrays in place cannot reach a cached original),
    with ``id_key``'s value suffixed by ``id_suffix`` (so per-case metrics keep copies apart) and
    ``mark_key: 1`` when ``mark_key`` is set, then passed through ``transform`` (none: the copy is
    only marked and renamed, for :func:`added_copies`).

    With ``fixed=True`` copy ``k`` is the same in every epoch and every process: before ``transform``
    runs, its random state (MONAI ``Randomizable.set_random_state``, e.g. a ``Compose`` of random
    transforms) and the global torch, NumPy and Python generators are seeded from ``(seed, k)``,
    and the global generators are restored afterwards. With ``fixed=False`` the transform draws
    anew each time (on-the-fly augmentation of the added items).

    Item semantics do not depend on shapes: an item is whatever ``data`` holds (a dict of a 2D
    radiograph, a 2D slice of a volume, a 3D patch). Not thread-safe with ``fixed=True`` when the
    same transform instance is shared by threads (``ThreadDataLoader``); process workers are fine.

    Args:
        data: the originals (a sequence of items or an indexable data set with ``len``).
        transform: what makes a copy from an original (a callable taking and returning an item).
        fraction: copies per original, in [0, 1]: 1 copies every original, 0 adds nothing.
        seed: chooses the originals to copy and seeds each fixed copy.
        fixed: the same copy every epoch (the papers generated theirs once).
        count: the number of copies, instead of ``fraction`` (e.g. the thesis's 300 per chunk).
        mark_key: if set, every item gets this key, 0 for originals and 1 for copies.
        id_key: the key of the case id that copies get ``id_suffix`` on (skipped when absent).
        id_suffix: appended to a copy's id.
    """

    def __init__(
        self,
        data: Sequence[Any] | torch.utils.data.Dataset,
        transform: Callable[[Any], Any] | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        fixed: bool = True,
        count: int | None = None,
        mark_key: str | None = None,
        id_key: str | None = "case_id",
        id_suffix: str = "_copy",
    ) -> None:
        n = len(data)
        if count is None:
            if not 0.0 <= float(fraction) <= 1.0:
                raise ValueError(f"fraction of originals to copy must be in [0, 1], got {fraction}")
            count = round(float(fraction) * n)
        if not 0 <= int(count) <= n:
            raise ValueError(f"cannot add {count} copies of distinct items to {n} originals")
        self.data = data
        self.transform = transform
        self.seed = int(seed)
        self.fixed = fixed
        self.mark_key = mark_key
        self.id_key = id_key
        self.id_suffix = id_suffix
        count = int(count)
        self.sources: list[int] = (
            list(range(n)) if count == n else sorted(random.Random(self.seed).sample(range(n), count))
        )

    def __len__(self) -> int:
        return len(self.data) + len(self.sources)

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        n = len(self.data)
        if index < n:
            item = self.data[index]
            return {**item, self.mark_key: 0} if self.mark_key is not None else item
        return self._copy(index - n)

    def _copy(self, k: int) -> Any:
        item = copy.deepcopy(self.data[self.sources[k]])
        if isinstance(item, dict):
            if self.id_key is not None and self.id_key in item:
                item[self.id_key] = f"{item[self.id_key]}{self.id_suffix}"
            if self.mark_key is not None:
                item[self.mark_key] = 1
        if self.transform is None:
            return item
        if not self.fixed:
            return self.transform(item)
        seed = _copy_seed(self.seed, k)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=seed)
        py_state, np_state = random.getstate(), np.random.get_state()
        # the CPU generator only: torch.manual_seed would reseed the GPUs' too, which fork_rng(devices=[])
        # does not restore (a ThreadDataLoader thread would reset the training's dropout draws)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            try:
                return self.transform(item)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def added_copies(
    items: Sequence[Mapping[Hashable, Any]],
    fraction: float = 1.0,
    seed: int = 0,
    mark_key: str = "copy",
    id_suffix: str = "_copy",
    id_key: str | None = "case_id",
    count: int | None = None,
) -> list[dict[Hashable, Any]]:
    """A datalist with copies added: ``items`` (each with ``mark_key: 0``) followed by copies of the
    originals :class:`AddedCopiesDataset` chooses (``mark_key: 1``, ids suffixed). Nothing is
    transformed here: a pipeline does that once per item (e.g. a ``CacheDataset`` whose transforms
    include :class:`medseg_monai.transforms.OnCopiesd`), so cached copies stay fixed and the copies
    show in the run's datalist."""
    return list(
        AddedCopiesDataset(
            [dict(it) for it in items],
            None,
            fraction=fraction,
            seed=seed,
            count=count,
            mark_key=mark_key,
            id_key=id_key,
            id_suffix=id_suffix,
        )
    )


# moved to medseg_monai.transforms (#38); the old path works one more release
__getattr__ = moved_names(__name__, {"OnCopiesd": "medseg_monai.transforms"})
