"""The BraTS network (Kayalibay et al. 2017) and Jaccard loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bundle_utils import gradient_check
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
