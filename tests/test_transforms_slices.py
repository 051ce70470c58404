"""2.5D on hand-made volumes: slice entropy, neighbour stacks and the entropy filter (the slice
transforms), and the slice data set and the neighbour-slice inferer built on them (WMH thesis,
Røvang 2021, secs. 6.3, 7.2, 7.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import Compose, RandFlipd

from medseg_monai.data import DatasetError
from medseg_monai.data.slices import SliceDataset
from medseg_monai.inferers import NeighbourSliceInferer
from medseg_monai.transforms import EntropySliceFilterd, ExtractSlicesd, slice_entropy, stack_neighbours


def _entropy_slices() -> list[np.ndarray]:
    """16x16 slices of integer levels: constant (0 bits), two halves (1), four levels (2), 256 levels (8)."""
    constant = np.full((16, 16), 7.0)
    halves = np.zeros((16, 16))
    halves[8:] = 1
    four = np.repeat(np.arange(4.0), 64).reshape(16, 16)
    uniform = np.arange(256.0).reshape(16, 16)
    return [constant, halves, four, uniform]


def test_slice_entropy_of_crafted_slices() -> None:
    constant, halves, four, uniform = _entropy_slices()
    assert slice_entropy(constant) == 0.0
    assert slice_entropy(halves) == pytest.approx(1.0)
    assert slice_entropy(four) == pytest.approx(2.0)
    assert slice_entropy(uniform) == pytest.approx(8.0)
    assert slice_entropy(torch.as_tensor(uniform)) == pytest.approx(8.0)
    assert slice_entropy(uniform, bins=16) == pytest.approx(4.0)
    # on a fixed range two levels far apart are still two levels
    assert slice_entropy(halves, value_range=(0, 255)) == pytest.approx(1.0)
    assert slice_entropy(constant, value_range=(0, 255)) == 0.0


def _entropy_volume() -> dict:
    slices = _entropy_slices()
    image = torch.as_tensor(np.stack(slices, axis=-1), dtype=torch.float32)[None]  # (1, 16, 16, 4)
    label = torch.zeros(1, 16, 16, 4)
    return {"image": image, "label": label, "case_id": "e"}


@pytest.mark.parametrize("entropy_range", ["volume", "slice"])
def test_entropy_filter_keeps_and_drops(entropy_range: str) -> None:
    volume = _entropy_volume()
    kept = ExtractSlicesd(min_entropy=2.0, entropy_range=entropy_range)(volume)
    assert [s["slice_index"] for s in kept] == [2, 3]  # 2 bits is kept, 1 bit dropped
    np.testing.assert_allclose(
        ExtractSlicesd(entropy_range=entropy_range).entropies(volume), [0, 1, 2, 8], atol=1e-9
    )
    assert [s["slice_index"] for s in ExtractSlicesd(min_entropy=1.5)(volume)] == [2, 3]
    assert len(ExtractSlicesd(min_entropy=None)(volume)) == 4


def test_entropy_slice_filter_on_sample_lists_and_in_compose() -> None:
    volume = _entropy_volume()
    samples = ExtractSlicesd(neighbours=3)(volume)
    filtered = EntropySliceFilterd("image", min_entropy=2.0, neighbours=3)(samples)
    assert [s["slice_index"] for s in filtered] == [2, 3]
    # channel 0 of a 3-slice stack is the slice below the centre: not what is filtered
    assert [s["slice_index"] for s in EntropySliceFilterd(min_entropy=2.0, neighbours=1)(samples)] == [3]
    assert EntropySliceFilterd(min_entropy=2.0, neighbours=3)(samples[0]) == []
    # in a Compose the filter receives the whole list; later transforms map over the kept samples
    pipeline = Compose(
        [
            ExtractSlicesd(neighbours=3),
            EntropySliceFilterd(min_entropy=2.0, neighbours=3),
            RandFlipd(["image", "label"], prob=1.0, spatial_axis=0),
        ]
    )
    out = pipeline(volume)
    assert [s["slice_index"] for s in out] == [2, 3]
    assert torch.equal(out[1]["image"][1], torch.flip(volume["image"][0, :, :, 3], dims=[0]))


def _z_volume(channels: int = 2, shape: tuple[int, int, int] = (4, 3, 5)) -> dict:
    """Image whose slice z (last axis) has value z + 100 c in channel c; label slice z has value z."""
    z = torch.arange(shape[2], dtype=torch.float32)
    image = torch.stack([z.expand(*shape) + 100 * c for c in range(channels)])
    label = z.expand(*shape)[None].clone()
    return {"image": image, "label": label, "case_id": "vol", "spacing": (1.0, 1.0, 3.0)}


def test_extract_slices_shapes_channel_order_and_edges() -> None:
    volume = _z_volume()
    samples = ExtractSlicesd(neighbours=3)(volume)
    assert len(samples) == 5
    for z, s in enumerate(samples):
        assert s["image"].shape == (6, 4, 3)
        assert s["label"].shape == (1, 4, 3)
        assert s["slice_index"] == z and s["case_id"] == "vol" and s["spacing"] == (1.0, 1.0, 3.0)
        assert (s["label"] == z).all()
        below, above = max(z - 1, 0), min(z + 1, 4)  # the edge slice repeats past the ends
        expected = [below, z, above, 100 + below, 100 + z, 100 + above]
        assert s["image"][:, 0, 0].tolist() == expected
        assert (s["image"] == torch.tensor(expected)[:, None, None]).all()
    five = ExtractSlicesd(neighbours=5)(volume)
    assert five[0]["image"][:5, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert five[4]["image"][:5, 0, 0].tolist() == [2, 3, 4, 4, 4]
    # slicing along the first spatial axis: samples (C*k, Y, Z)
    along_x = ExtractSlicesd(axis=0)(volume)
    assert len(along_x) == 4 and along_x[0]["image"].shape == (6, 3, 5)
    # MetaTensor volumes give plain tensor slices
    meta = {**volume, "image": MetaTensor(volume["image"]), "label": MetaTensor(volume["label"])}
    out = ExtractSlicesd()(meta)[2]
    assert type(out["image"]) is torch.Tensor and out["image"][:, 0, 0].tolist() == [1, 2, 3, 101, 102, 103]
    with pytest.raises(ValueError, match="odd"):
        ExtractSlicesd(neighbours=2)


def test_slice_dataset_length_and_shuffled_batches() -> None:
    volumes = [{**_z_volume(1, (4, 4, n)), "case_id": f"case{i}"} for i, n in enumerate((3, 6, 5))]
    ds = SliceDataset(volumes, neighbours=3)
    assert len(ds) == 14
    assert ds.index[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    item = ds[5]
    assert item["case_id"] == "case1" and item["slice_index"] == 2
    assert item["image"][:, 0, 0].tolist() == [1, 2, 3] and item["image"].shape == (3, 4, 4)
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=0)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 4, 4) and batch["label"].shape[1:] == (1, 4, 4)
        seen += list(zip(batch["case_id"], batch["slice_index"].tolist(), strict=True))
    assert sorted(seen) == sorted((f"case{v}", z) for v, z in ds.index)
    assert seen != sorted(seen)  # shuffled across volumes
    # per-slice transform, and an entropy-filtered index over a CacheDataset of volumes
    flipped = SliceDataset(volumes, transform=RandFlipd(["image"], prob=1.0, spatial_axis=0))
    assert torch.equal(flipped[5]["image"], torch.flip(item["image"], dims=[1]))
    cached = CacheDataset([_entropy_volume(), _entropy_volume()], transform=Compose([]), progress=False)
    filtered = SliceDataset(cached, min_entropy=2.0)
    assert filtered.index == [(0, 2), (0, 3), (1, 2), (1, 3)]
    # nothing left to train on: one line, not the sampler's "num_samples=0" later
    with pytest.raises(DatasetError, match="no training slice: all slices of the 2 volume"):
        SliceDataset(cached, min_entropy=9.0)


def test_neighbour_slice_inferer_restacks_to_input_geometry() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, 5, 7, generator=g)
    k = 3

    def centre_slices(stack: torch.Tensor) -> torch.Tensor:  # (n, C*k, A, B) -> (n, C, A, B)
        return stack[:, k // 2 :: k]

    for axis in (-1, 0, 1):
        out = NeighbourSliceInferer(axis=axis, neighbours=k, sw_batch_size=4)(x, centre_slices)
        assert out.shape == x.shape
        assert torch.equal(out, x)

    # the whole stack comes back as ExtractSlicesd builds it in training
    stacks = NeighbourSliceInferer(neighbours=k, sw_batch_size=5)(x, lambda s: s)
    assert stacks.shape == (2, 6, 6, 5, 7)
    for b in range(2):
        samples = ExtractSlicesd(neighbours=k)({"image": x[b], "label": x[b, :1]})
        for z, sample in enumerate(samples):
            assert torch.equal(stacks[b, :, :, :, z], sample["image"])
    assert torch.equal(stack_neighbours(x, [0, 6], -1, k)[1, 1], samples[6]["image"])

    # a module runs on its own device; MetaTensor input keeps its metadata
    net = torch.nn.Conv2d(6, 1, kernel_size=1)
    meta = MetaTensor(x, affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])))
    with torch.no_grad():
        out = NeighbourSliceInferer(neighbours=k, sw_batch_size=3)(meta, net)
    assert isinstance(out, MetaTensor) and out.shape == (2, 1, 6, 5, 7)
    assert torch.equal(out.affine, meta.affine)
    with torch.no_grad():
        assert torch.allclose(out[0, :, :, :, 3], net(stack_neighbours(x[0], [3], -1, k))[0], atol=1e-6)
