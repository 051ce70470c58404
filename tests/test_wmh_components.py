"""WMH study components on hand-made tensors: focal Tversky loss and attention U-Net (Røvang 2021
thesis); the metrics are in test_wmh_metrics.py, the 2.5D slicing and inference in
test_transforms_slices.py."""

from __future__ import annotations

import pytest
import torch

from medseg_monai.losses import FocalTverskyLoss
from medseg_monai.networks import AttentionUNet, ClassicUNet

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
