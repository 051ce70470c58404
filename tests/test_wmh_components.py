"""WMH study components on hand-made tensors: focal Tversky loss, 2.5D slicing and inference,
attention U-Net (Røvang 2021 thesis); the metrics are in test_wmh_metrics.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.transforms import Compose, RandFlipd

from medseg_monai.data import DatasetError
from medseg_monai.losses import FocalTverskyLoss
from medseg_monai.networks import AttentionUNet, ClassicUNet
from medseg_monai.slices import (
    EntropySliceFilterd,
    ExtractSlicesd,
    NeighbourSliceInferer,
    SliceDataset,
    slice_entropy,
    stack_neighbours,
)

# ---------------------------------------------------------------- focal Tversky loss


def _focal_tversky_by_hand(p, r, alpha, beta, gamma, omega, keep=None):
    keep = torch.ones_like(r, dtype=torch.bool) if keep is None else keep
    p, r = p[keep].double(), r[keep].double()
    tp, fn, fp = (p * r).sum(), ((1 - p) * r).sum(), (p * (1 - r)).sum()
    ti = (tp + omega) / (tp + alpha * fn + beta * fp + omega)
    return (1 - ti) ** gamma


def test_focal_tversky_thesis_worked_example() -> None:
    # eq. 4.9-4.10: nothing predicted, one reference pixel, Omega = 2, alpha = 0.7 -> TI = 2 / 2.7
    p = torch.zeros(2, 1, 8, 8)
    r = torch.zeros(2, 1, 8, 8)
    r[1, 0, 3, 4] = 1
    ti = 2 / 2.7
    assert ti == pytest.approx(0.74, abs=0.005)
    loss = FocalTverskyLoss(alpha=0.7, beta=0.3, smooth=2.0, sigmoid=False)
    assert loss(p, r).item() == pytest.approx((1 - ti) ** (4 / 3), rel=1e-6)  # eq. 4.12, exponent gamma
    linear = FocalTverskyLoss(gamma=1.0, sigmoid=False)  # eq. 4.11
    assert linear(p, r).item() == pytest.approx(1 - ti, rel=1e-6)
    # without smoothing the same batch is the maximum loss (eq. 4.9)
    assert FocalTverskyLoss(smooth=0.0, sigmoid=False)(p, r).item() == pytest.approx(1.0)
    # all counts zero: TI = 1, loss 0
    assert FocalTverskyLoss(sigmoid=False)(p, torch.zeros_like(r)).item() == pytest.approx(0.0)


@pytest.mark.parametrize(("alpha", "beta"), [(0.7, 0.3), (0.85, 0.15)])
def test_focal_tversky_matches_formula_over_flattened_batch(alpha: float, beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 6, generator=g) * 3
    r = (torch.rand(3, 1, 5, 6, generator=g) > 0.7).float()
    expected = _focal_tversky_by_hand(torch.sigmoid(logits), r, alpha, beta, 4 / 3, 2.0)
    got = FocalTverskyLoss(alpha=alpha, beta=beta)(logits, r)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    per_image = torch.stack(
        [_focal_tversky_by_hand(torch.sigmoid(logits[i]), r[i], alpha, beta, 4 / 3, 2.0) for i in range(3)]
    )
    assert got.item() != pytest.approx(per_image.mean().item(), rel=1e-3)  # one TI per batch


def test_focal_tversky_gradient_finite() -> None:
    logits = torch.randn(4, 1, 8, 8, requires_grad=True)
    r = (torch.rand(4, 1, 8, 8) > 0.8).float()
    FocalTverskyLoss(alpha=0.85, beta=0.15)(logits, r).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # a perfect prediction (1 - TI = 0) has a zero, not NaN, gradient
    p = r.clone().requires_grad_(True)
    loss = FocalTverskyLoss(sigmoid=False)(p, r)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(p.grad).all()


def test_focal_tversky_ignore_index_excluded() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 6, 6, generator=g, requires_grad=True)
    r = (torch.rand(2, 1, 6, 6, generator=g) > 0.6).float()
    ignored = torch.rand(2, 1, 6, 6, generator=g) > 0.7
    r[ignored] = -1
    loss_fn = FocalTverskyLoss(ignore_index=-1)
    loss = loss_fn(logits, r)
    expected = _focal_tversky_by_hand(torch.sigmoid(logits.detach()), r, 0.7, 0.3, 4 / 3, 2.0, keep=~ignored)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert (logits.grad[ignored] == 0).all()
    # whatever is predicted on ignored voxels does not matter
    changed = logits.detach().clone()
    changed[ignored] = 10.0
    assert loss_fn(changed, r).item() == pytest.approx(loss.item(), rel=1e-6)


def test_focal_tversky_rejects_multichannel() -> None:
    with pytest.raises(ValueError, match="binary"):
        FocalTverskyLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


# ---------------------------------------------------------------- entropy and slicing


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


# ---------------------------------------------------------------- networks


SMALL = (4, 8, 16, 32, 64)


@pytest.mark.parametrize(
    ("pyramid", "act", "norm"),
    [(False, "relu", "batch"), (True, "mish", ("group", {"num_groups": 4})), (True, "relu", "batch")],
)
def test_attention_unet_shapes_gradients_and_maps(pyramid: bool, act: str, norm) -> None:
    torch.manual_seed(0)
    net = AttentionUNet(
        in_channels=3, out_channels=1, features=SMALL, act=act, norm=norm, pyramid_input=pyramid
    )
    x = torch.randn(2, 3, 32, 32)
    logits, maps = net(x, return_attention=True)
    assert logits.shape == (2, 1, 32, 32)
    assert [m.shape for m in maps] == [(2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 16, 16)]  # deepest first
    assert all(((m > 0) & (m < 1)).all() for m in maps)
    assert [m.shape for m in net.attention_maps] == [m.shape for m in maps]
    assert not any(m.requires_grad for m in net.attention_maps)
    FocalTverskyLoss()(logits, (torch.rand(2, 1, 32, 32) > 0.9).float()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert net.down_1.convs.conv_0.conv.in_channels == SMALL[0] + (3 if pyramid else 0)
    assert net.final_conv.bias is None


def test_attention_unet_options_and_classic_weights() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32)
    all_gates = AttentionUNet(features=SMALL, gated_skips=4)
    all_gates(x)
    assert [m.shape[-1] for m in all_gates.attention_maps] == [4, 8, 16, 32]
    assert torch.is_tensor(all_gates(x))
    # a ClassicUNet state dict loads into the gates' host network, leaving only the gates new
    classic = ClassicUNet(in_channels=1, out_channels=1, features=SMALL, out_bias=False)
    result = AttentionUNet(features=SMALL).load_state_dict(classic.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("gates.") for k in result.missing_keys)
    with pytest.raises(ValueError, match="gated_skips"):
        AttentionUNet(features=SMALL, gated_skips=5)


def test_classic_unet_expresses_unet256() -> None:
    # the thesis's UNet256: 32-64-128-256-512 channels (Fig. 6.2: 512 in the bottleneck), 2x2
    # max-pool, transposed convs, 1x1 output conv without bias; the weights it starts from in
    # sec. 8.1 are github.com/mateuszbuda/brain-segmentation-pytorch, 7,763,041 parameters with
    # an output bias
    unet256 = ClassicUNet(in_channels=3, out_channels=1, features=(32, 64, 128, 256, 512), out_bias=False)
    assert sum(p.numel() for p in unet256.parameters()) == 7_763_041 - 1
    assert isinstance(unet256.down_1.max_pooling, torch.nn.MaxPool2d)
    assert isinstance(unet256.upcat_4.upsample.deconv, torch.nn.ConvTranspose2d)
    assert unet256.final_conv.bias is None
    mish_group = ClassicUNet(
        in_channels=1,
        out_channels=1,
        features=SMALL,
        act="mish",
        norm=("group", {"num_groups": 4}),
        out_bias=False,
    )
    assert mish_group(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert any(type(m).__name__ == "Mish" for m in mish_group.modules())  # MONAI's or torch's
    assert any(isinstance(m, torch.nn.GroupNorm) for m in mish_group.modules())
