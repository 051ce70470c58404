"""The BraTS network (Kayalibay et al. 2017) and Jaccard loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bundle_utils import gradient_check
from medseg_monai.losses import RegionDiceLoss
from medseg_monai.networks import MultiScaleMapUNet


@pytest.mark.slow  # 30 s on this CPU; the switches below check shapes and gradients at a small size
def test_paper_crop_shape_and_gradient_flow() -> None:
    """4 modalities at the paper's 160 x 144 x 128 crop in, 5 class maps of the same size out."""
    torch.manual_seed(0)
    net = MultiScaleMapUNet(in_channels=4, out_channels=5)
    y = gradient_check(net, torch.randn(1, 4, 160, 144, 128))
    assert y.shape == (1, 5, 160, 144, 128)


@pytest.mark.parametrize("skip", ["concat", "sum", "none"])
@pytest.mark.parametrize("n_maps", [1, 3])
def test_patch_shape_and_gradient_for_each_switch(skip: str, n_maps: int) -> None:
    torch.manual_seed(0)
    net = MultiScaleMapUNet(in_channels=2, out_channels=3, features=(4, 8, 16, 32), n_maps=n_maps, skip=skip)
    y = gradient_check(net, torch.randn(2, 2, 32, 24, 16))
    assert y.shape == (2, 3, 32, 24, 16)


def test_architecture_as_the_paper_states() -> None:
    net = MultiScaleMapUNet(in_channels=4, out_channels=5)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    # 3x3x3 with zero padding except the 1x1x1 segmentation maps and channel reductions
    for c in convs:
        assert c.kernel_size in ((3, 3, 3), (1, 1, 1)) and c.padding_mode == "zeros"
        assert c.padding == tuple(k // 2 for k in c.kernel_size)
    ones = [c for c in convs if c.kernel_size == (1, 1, 1)]
    assert len(ones) == 3 + 3  # a reduction before each of 3 transposed convolutions + 3 maps
    assert [u.reduce[0].out_channels * 2 for u in net.ups] == [u.reduce[0].in_channels for u in net.ups]
    assert not any(isinstance(m, (torch.nn.MaxPool3d, torch.nn.AvgPool3d)) for m in net.modules())
    assert [d.down[0].stride for d in net.downs] == [(2, 2, 2)] * 3
    # batch norm before every PReLU
    seq = [m for m in net.modules() if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.PReLU))]
    assert all(
        isinstance(a, torch.nn.BatchNorm3d) and isinstance(b, torch.nn.PReLU)
        for a, b in zip(seq[::2], seq[1::2], strict=True)
    )
    assert len(seq) % 2 == 0


def test_long_skip_modes_join_the_encoder_features_as_named() -> None:
    torch.manual_seed(0)
    x, e1, e2 = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 4, 8, 8, 8), torch.randn(1, 4, 8, 8, 8)
    for skip in ("concat", "sum", "none"):
        net = MultiScaleMapUNet(
            in_channels=1, out_channels=2, features=(4, 8, 16), n_maps=1, skip=skip
        ).eval()
        up = net.ups[-1]
        seen: list[torch.Tensor] = []
        up.conv.register_forward_hook(lambda m, inp, out, seen=seen: seen.append(inp[0]))
        with torch.no_grad():
            u = up.up(up.reduce(x))
            up(x, e1)
        expected = {"concat": torch.cat([e1, u], 1), "sum": u + e1, "none": u}[skip]
        torch.testing.assert_close(seen[0], expected)
        with torch.no_grad():
            changed = not torch.allclose(up(x, e1), up(x, e2))
        assert changed == (skip != "none")


def test_multiscale_maps_are_upsampled_and_summed() -> None:
    torch.manual_seed(0)
    for n_maps in (1, 2, 3):
        net = MultiScaleMapUNet(in_channels=1, out_channels=2, n_maps=n_maps).eval()
        feats: list[torch.Tensor] = []
        for up in net.ups:
            up.register_forward_hook(lambda m, inp, out, feats=feats: feats.append(out))
        with torch.no_grad():
            y = net(torch.randn(1, 1, 16, 16, 8))
            maps = [conv(f) for conv, f in zip(net.maps, feats[-n_maps:], strict=True)]
            expected = maps[0]
            for m in maps[1:]:
                expected = m + F.interpolate(expected, size=m.shape[2:], mode="trilinear")
        torch.testing.assert_close(y, expected)
        assert len(net.maps) == n_maps and maps[0].shape[2] == 16 // 2 ** (n_maps - 1)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="skip must be one of concat, sum, none"):
        MultiScaleMapUNet(skip="add")
    with pytest.raises(ValueError, match="n_maps must be from 1 to 3"):
        MultiScaleMapUNet(n_maps=4)
    with pytest.raises(ValueError, match="divisible by 8"):
        MultiScaleMapUNet(in_channels=1)(torch.randn(1, 1, 20, 16, 16))


def test_region_dice_loss_against_its_formula_by_hand() -> None:
    """Two voxels, classes (background, a, b); regions {a, b} and {b}. Voxel 1 is class a with
    p = (0.7, 0.2, 0.1), voxel 2 class b with p = (0.1, 0.6, 0.3):
    region {a, b}: P = (0.3, 0.9), Y = (1, 1): Dice 2 * 1.2 / (1.2 + 2) = 0.75;
    region {b}: P = (0.1, 0.3), Y = (0, 1): Dice 2 * 0.3 / (0.4 + 1) = 3 / 7."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]).T.reshape(1, 3, 2, 1)
    target = torch.tensor([1, 2]).reshape(1, 1, 2, 1)
    loss = RegionDiceLoss([[1, 2], [2]], smooth_nr=0.0, smooth_dr=0.0)(probs.log(), target)
    assert loss.item() == pytest.approx(1 - (0.75 + 3 / 7) / 2, abs=1e-6)
    # a voxel of one tumour class predicted as the other costs nothing in the union region
    swapped = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 2, 1)
    union_only = RegionDiceLoss([[1, 2]], smooth_nr=0.0, smooth_dr=0.0)
    assert union_only((swapped + 1e-12).log(), target).item() == pytest.approx(0.0, abs=1e-6)


def test_region_dice_loss_per_image_and_batch_pooling_differ() -> None:
    """batch=True pools every image's voxels into one Dice; batch=False averages per-image Dice."""
    logits = torch.randn(2, 4, 6, 5, 4, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 6, 5, 4))
    regions = [[1, 2, 3], [1, 3], [3]]
    p = logits.softmax(1)
    y = F.one_hot(target[:, 0], 4).movedim(-1, 1).float()
    expected_batch, expected_image = [], []
    for r in regions:
        pr, yr = p[:, r].sum(1), y[:, r].sum(1)
        expected_batch.append(1 - (2 * (pr * yr).sum() + 1e-5) / (pr.sum() + yr.sum() + 1e-5))
        for b in range(2):
            expected_image.append(1 - (2 * (pr[b] * yr[b]).sum() + 1e-5) / (pr[b].sum() + yr[b].sum() + 1e-5))
    batch = RegionDiceLoss(regions)(logits, target)
    assert batch.item() == pytest.approx(torch.stack(expected_batch).mean().item(), abs=1e-6)
    per_image = RegionDiceLoss(regions, batch=False)(logits, target)
    assert per_image.item() == pytest.approx(torch.stack(expected_image).mean().item(), abs=1e-6)
    batch.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_region_dice_loss_refuses_a_region_beyond_the_classes() -> None:
    with pytest.raises(ValueError, match=r"regions \[\[1, 4\]\] name a class beyond the input's 4 channels"):
        RegionDiceLoss([[1, 4]])(torch.randn(1, 4, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="non-empty regions"):
        RegionDiceLoss([[1], []])
