"""Augmented copies added to the originals (medseg_monai.data.copies): the X-ray poster's noisy
copies and the WMH thesis's flipped copies."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, RandFlipd, RandGaussianNoised

from medseg_monai.data import AddedCopiesDataset, added_copies
from medseg_monai.handlers.resume import random_states
from medseg_monai.transforms import OnCopiesd


def _items(n: int = 10) -> list[dict]:
    return [{"image": MetaTensor(torch.full((1, 4, 4), float(i))), "case_id": f"c{i}"} for i in range(n)]


def _noise() -> RandGaussianNoised:
    return RandGaussianNoised(keys="image", prob=1.0, std=1.0, sample_std=False)


def test_length_and_originals_first_untouched() -> None:
    items = _items()
    snapshot = [it["image"].clone() for it in items]
    ds = AddedCopiesDataset(items, _noise(), fraction=1.0)
    assert len(ds) == 20
    for i in range(10):
        assert ds[i] is items[i]  # the originals as the data set holds them
    [ds[i] for i in range(10, 20)]  # making the copies leaves the originals alone
    assert all(torch.equal(it["image"], s) for it, s in zip(items, snapshot, strict=True))
    assert ds[-1]["case_id"] == "c9_copy" and ds[10]["case_id"] == "c0_copy"
    with pytest.raises(IndexError):
        ds[20]


def test_copies_are_transformed_new_items() -> None:
    items = _items()
    ds = AddedCopiesDataset(items, _noise(), fraction=1.0)
    for k in range(10):
        copy_ = ds[10 + k]
        assert copy_ is not items[k] and copy_["image"] is not items[k]["image"]
        diff = copy_["image"] - items[k]["image"]
        assert diff.abs().max() > 0.1 and 0.3 < float(diff.std()) < 2.0


def test_in_place_transform_cannot_reach_cached_originals() -> None:
    def in_place(d: dict) -> dict:
        d["image"].add_(100.0)
        return d

    cache = CacheDataset(_items(4), transform=None, progress=False)
    ds = AddedCopiesDataset(cache, in_place)
    assert float(ds[4]["image"].max()) == 100.0 and float(ds[4]["image"].max()) == 100.0
    assert float(cache[0]["image"].max()) == 0.0


def test_fixed_copies_are_the_same_every_epoch_and_draw_nothing_global() -> None:
    ds = AddedCopiesDataset(_items(), Compose([_noise(), RandFlipd("image", prob=0.5)]), seed=3)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = [ds[i]["image"] for i in range(10, 20)]
    assert torch.equal(torch.rand(1), expected_next)  # global generators restored
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    for _ in range(2):  # two epochs in another order give the same copies
        for batch in loader:
            for cid, img in zip(batch["case_id"], batch["image"], strict=True):
                if cid.endswith("_copy"):
                    assert torch.equal(img, first[int(cid[1:-5])])
    # each copy has its own noise; another seed other noise; fixed=False differs per access
    assert not torch.equal(first[0] - 0, first[1] - 1)
    other = AddedCopiesDataset(_items(), Compose([_noise()]), seed=4)
    assert not torch.equal(other[10]["image"], first[0])
    free = AddedCopiesDataset(_items(), _noise(), fixed=False)
    assert not torch.equal(free[10]["image"], free[10]["image"])


def test_fixed_also_covers_transforms_that_use_the_global_generators() -> None:
    def global_noise(d: dict) -> dict:
        return {**d, "image": d["image"] + torch.randn(d["image"].shape) + np.random.rand() + random.random()}

    ds = AddedCopiesDataset(_items(3), global_noise, seed=1)
    assert torch.equal(ds[3]["image"], ds[3]["image"])
    assert not torch.equal(ds[3]["image"], ds[4]["image"] - 1)


def test_fraction_zero_is_the_data_set_itself() -> None:
    items = _items()
    ds = AddedCopiesDataset(items, _noise(), fraction=0.0)
    assert len(ds) == 10 and [ds[i] for i in range(10)] == items
    assert added_copies(items, 0.0) == [{**it, "copy": 0} for it in items]


def test_seeded_choice_of_distinct_originals() -> None:
    items = _items(20)
    a = AddedCopiesDataset(items, None, fraction=0.25, seed=7)
    assert len(a) == 25 and len(set(a.sources)) == 5 and a.sources == sorted(a.sources)
    assert a.sources == AddedCopiesDataset(items, None, fraction=0.25, seed=7).sources
    assert a.sources != AddedCopiesDataset(items, None, fraction=0.25, seed=8).sources
    assert [a[20 + k]["case_id"] for k in range(5)] == [f"c{i}_copy" for i in a.sources]
    assert len(AddedCopiesDataset(items, None, count=3)) == 23  # the thesis's "300 of each chunk"
    for bad in ({"fraction": 1.5}, {"count": 21}):
        with pytest.raises(ValueError):
            AddedCopiesDataset(items, None, **bad)


def test_datalist_copies_marked_and_transformed_once_by_a_cached_pipeline() -> None:
    items = _items(4)
    datalist = added_copies(items, 1.0, mark_key="noisy", id_suffix="_noisy")
    assert [d["case_id"] for d in datalist] == [
        "c0",
        "c1",
        "c2",
        "c3",
        "c0_noisy",
        "c1_noisy",
        "c2_noisy",
        "c3_noisy",
    ]
    assert [d["noisy"] for d in datalist] == [0] * 4 + [1] * 4 and "noisy" not in items[0]

    def add_one(d: dict) -> dict:
        return {**d, "image": d["image"] + 1}

    cached = CacheDataset(datalist, transform=Compose([OnCopiesd(add_one, "noisy")]), progress=False)
    assert [float(cached[i]["image"].max()) for i in range(8)] == [0, 1, 2, 3, 1, 2, 3, 4]


def test_the_training_checkpoint_finds_random_transforms_inside_a_wrapped_data_set() -> None:
    flip, noise = RandFlipd("image", prob=0.5), _noise()
    wrapped = AddedCopiesDataset(Dataset(_items(2), transform=flip), noise, fixed=False)
    flip.R.seed(11)
    saved = random_states([wrapped])["transforms"]
    # the inner Dataset's Compose and flip, then the copies' noise and the array transform it draws from
    assert len(saved) == 4
    assert np.array_equal(saved[1][1], np.random.RandomState(11).get_state()[1])
    assert np.array_equal(saved[2][1], noise.R.get_state()[1])
    assert np.array_equal(saved[3][1], noise.rand_gaussian_noise.R.get_state()[1])
