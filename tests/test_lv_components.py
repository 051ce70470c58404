"""The LV network (Avetisian's factorised-convolution U-Net), its L2 parameter groups and the soft
IoU loss against hand-computed values."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from monai.losses import DiceLoss

from bundle_utils import gradient_check
from medseg_monai.losses import SoftIoULoss
from medseg_monai.networks import FactorizedConvUNet, weight_decay_groups
from medseg_monai.networks.factorized import FACTORIZED_KERNELS


def _monai_jaccard() -> DiceLoss:
    """MONAI's soft Jaccard loss of the foreground classes, unsmoothed: per-class IoUs averaged."""
    return DiceLoss(
        jaccard=True,
        softmax=True,
        to_onehot_y=True,
        include_background=False,
        batch=True,
        smooth_nr=0,
        smooth_dr=0,
    )


def _convs(m: torch.nn.Module) -> list[torch.nn.Conv3d]:
    return [c for c in m.modules() if type(c) is torch.nn.Conv3d]


def test_paper_width_shape_and_gradient_flow() -> None:
    """The paper's network (30 channels first, 3 poolings) on a small short-axis block."""
    torch.manual_seed(0)
    net = FactorizedConvUNet(in_channels=1, out_channels=3)
    y = gradient_check(net, torch.randn(1, 1, 64, 64, 16))
    assert y.shape == (1, 3, 64, 64, 16)


@pytest.mark.parametrize("conv", ["factorized", "full"])
def test_full_slice_size_shape_and_gradient_flow(conv: str) -> None:
    """A whole 256 x 256 x 16 short-axis stack (narrow, to keep the test short)."""
    torch.manual_seed(0)
    net = FactorizedConvUNet(in_channels=1, out_channels=2, features=4, conv=conv)
    y = gradient_check(net, torch.randn(1, 1, 256, 256, 16))
    assert y.shape == (1, 2, 256, 256, 16)


def test_batch_norm_switch_shape_and_gradient_flow() -> None:
    torch.manual_seed(0)
    net = FactorizedConvUNet(in_channels=2, out_channels=3, features=4, norm="batch")
    y = gradient_check(net, torch.randn(2, 2, 16, 16, 8))
    assert y.shape == (2, 3, 16, 16, 8)


def test_architecture_as_the_paper_states() -> None:
    net = FactorizedConvUNet(in_channels=1, out_channels=2)
    assert [b[0][0].out_channels for b in [net.stem, *net.downs]] == [30, 60, 120, 240]
    assert [b[0][0].out_channels for b in net.ups] == [120, 60, 30]
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool3d)]
    assert len(pools) == 1 and pools[0].kernel_size == 2 and pools[0].stride == 2
    # up-convolutions: kernel 1, stride 2, halving the channels before the concatenation
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert [(u.in_channels, u.out_channels) for u in ups] == [(240, 120), (120, 60), (60, 30)]
    assert all(u.kernel_size == (1, 1, 1) and u.stride == (2, 2, 2) for u in ups)
    assert [b[0][0].in_channels for b in net.ups] == [240, 120, 60]
    # every block: four 2D convolutions in the documented order, each then ReLU and dropout
    for b in [net.stem, *net.downs, *net.ups]:
        assert [c.kernel_size for c in _convs(b)] == list(FACTORIZED_KERNELS)
        for unit in b:
            assert [type(m) for m in unit] == [torch.nn.Conv3d, torch.nn.ReLU, torch.nn.Dropout]
            assert unit[2].p == pytest.approx(0.15)  # keep probability 0.85
            assert unit[0].padding == tuple(k // 2 for k in unit[0].kernel_size)
    assert net.out.kernel_size == (1, 1, 1) and net.out.in_channels == 30
    full = FactorizedConvUNet(conv="full")
    assert [len(_convs(b)) for b in [full.stem, *full.downs, *full.ups]] == [1] * 7
    assert all(c.kernel_size == (3, 3, 3) for b in full.ups for c in _convs(b))


def test_weights_per_channel_pair_36_factorized_27_full() -> None:
    """Sec. 2.1: "single 3x3x3 convolution has 27 parameters, while 4 3x3 convolutions have only 36"."""
    for conv, per_pair in (("factorized", 36), ("full", 27)):
        net = FactorizedConvUNet(in_channels=1, out_channels=2, conv=conv)
        for block in [net.stem, *net.downs, *net.ups]:
            convs = _convs(block)
            assert sum(c.weight.numel() // (c.in_channels * c.out_channels) for c in convs) == per_pair
            cin, cout = convs[0].in_channels, convs[0].out_channels
            # exact weight count: the first convolution maps cin -> cout, the others cout -> cout
            expected = 9 * (cin * cout + 3 * cout * cout) if conv == "factorized" else 27 * cin * cout
            assert sum(c.weight.numel() for c in convs) == expected
            assert sum(c.bias.numel() for c in convs) == len(convs) * cout
    block = FactorizedConvUNet(features=30).downs[0]  # 30 -> 60 channels
    assert sum(c.weight.numel() for c in _convs(block)) == 9 * (30 * 60 + 3 * 60 * 60) == 113_400


def test_spatial_size_not_a_multiple_of_8_is_refused() -> None:
    net = FactorizedConvUNet(features=2)
    with pytest.raises(ValueError, match=r"spatial size \(64, 64, 12\) is not a multiple of 8") as e:
        net(torch.randn(1, 1, 64, 64, 12))
    assert "\n" not in str(e.value) and "DivisiblePad(k=8)" in str(e.value)
    assert FactorizedConvUNet(features=2, depth=2)(torch.randn(1, 1, 8, 8, 12)).shape == (1, 2, 8, 8, 12)
    with pytest.raises(ValueError, match="conv must be one of factorized, full"):
        FactorizedConvUNet(conv="separable")
    with pytest.raises(ValueError, match="norm must be None or 'batch'"):
        FactorizedConvUNet(norm="instance")


def test_batch_norm_only_with_the_switch() -> None:
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in FactorizedConvUNet().modules()
    )
    net = FactorizedConvUNet(norm="batch")
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 7 * 4  # after each convolution of the 7 blocks
    for b in [net.stem, *net.downs, *net.ups]:
        for unit in b:
            assert [type(m) for m in unit] == [
                torch.nn.Conv3d,
                torch.nn.BatchNorm3d,
                torch.nn.ReLU,
                torch.nn.Dropout,
            ]
            assert unit[0].bias is None


def test_dropout_right_before_the_output_layer() -> None:
    torch.manual_seed(0)
    net = FactorizedConvUNet(in_channels=1, out_channels=2, features=2, dropout=0.5)
    order: list[str] = []
    for name, m in net.named_modules():
        if name and not list(m.children()):
            m.register_forward_hook(lambda m, i, o, name=name: order.append(name))
    x = torch.randn(1, 1, 8, 8, 8)
    net(x)
    assert order[-2:] == ["out_dropout", "out"]
    assert isinstance(net.out_dropout, torch.nn.Dropout) and net.out_dropout.p == 0.5
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))  # dropout off in evaluation


def test_weight_decay_groups_decay_convolution_weights_only() -> None:
    net = FactorizedConvUNet(features=2, norm="batch")
    groups = weight_decay_groups(net, 3e-4)
    decayed, plain = groups
    assert decayed["weight_decay"] == 3e-4 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    conv_weights = {
        id(m.weight)
        for m in net.modules()
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))  # transposed ones too
    }
    assert {id(p) for p in decayed["params"]} == conv_weights
    assert all(names[id(p)].endswith(("bias", ".weight")) for p in plain["params"])
    assert all(names[id(p)].endswith("bias") or p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(names)
    no_norm = FactorizedConvUNet(features=2)
    biases = {id(p) for n, p in no_norm.named_parameters() if n.endswith("bias")}
    _, plain = weight_decay_groups(no_norm, 3e-4)
    assert {id(p) for p in plain["params"]} == biases
    torch.optim.Adam(weight_decay_groups(no_norm, 3e-4), lr=7.6e-5, betas=(0.9, 0.999))


def _logits(probs: list[list[list[float]]]) -> torch.Tensor:
    """(B, C, N) logits whose softmax over C gives ``probs`` (B, N, C) exactly."""
    return torch.tensor(probs, dtype=torch.float64).log().permute(0, 2, 1).requires_grad_()


def test_soft_iou_is_the_papers_formula_by_hand() -> None:
    """2 images x 2 voxels, background + 2 classes; one IoU over the batch, classes pooled."""
    logits = _logits(
        [
            [[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]],  # image 0: labels 1, 2
            [[1 / 2, 1 / 4, 1 / 4], [1 / 8, 1 / 8, 3 / 4]],  # image 1: labels 0, 2
        ]
    )
    labels = torch.tensor([[[1, 2]], [[0, 2]]])
    # foreground (channels 1, 2) only: intersection 1/4 + 1/4 + 0 + 3/4
    inter = Fraction(1, 4) + Fraction(1, 4) + Fraction(3, 4)
    sum_y = 3  # three foreground voxels
    sum_p = Fraction(1, 2) + Fraction(3, 4) + Fraction(1, 2) + Fraction(7, 8)  # per voxel
    expected = 1 - inter / (sum_y + sum_p - inter)
    assert expected == Fraction(5, 7)
    loss = SoftIoULoss()(logits, labels)
    assert loss.item() == pytest.approx(5 / 7, abs=1e-12)
    one_hot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 2, 1)
    assert SoftIoULoss()(logits, one_hot).item() == pytest.approx(5 / 7, abs=1e-12)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # MONAI's Jaccard averages per-class IoUs (1 - (1/4 / 15/8 + 1 / 5/2) / 2 = 11/15): not the paper's
    monai = _monai_jaccard()
    assert monai(logits, labels).item() == pytest.approx(11 / 15, abs=1e-12)


def test_soft_iou_equals_monai_jaccard_with_one_foreground_class() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 2, 4, 4, 4), torch.randint(0, 2, (2, 1, 4, 4, 4))
    monai = _monai_jaccard()
    torch.testing.assert_close(SoftIoULoss()(logits, labels), monai(logits, labels))


def test_soft_iou_perfect_prediction_and_background_left_out() -> None:
    labels = torch.tensor([[[[0, 1], [2, 0]]]])  # (1, 1, 2, 2)
    perfect = 50.0 * torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float()
    assert SoftIoULoss()(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    # an image of background only, predicted as background: the background overlap counts for
    # nothing, only the (tiny) foreground probabilities, so the loss is 1
    background = torch.zeros_like(labels)
    bg_logits = 50.0 * torch.nn.functional.one_hot(background[:, 0], 3).permute(0, 3, 1, 2).float()
    assert SoftIoULoss()(bg_logits, background).item() == pytest.approx(1.0)
    # foreground wholly missed, background right everywhere else: still loss 1
    missed = 50.0 * torch.nn.functional.one_hot(torch.zeros_like(labels[:, 0]), 3).permute(0, 3, 1, 2)
    assert SoftIoULoss()(missed.float(), labels).item() == pytest.approx(1.0)


def test_soft_iou_gradient_finite_and_bad_shapes_refused() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 4, requires_grad=True)
    loss = SoftIoULoss()(logits, torch.randint(0, 3, (2, 1, 8, 8, 4)))
    loss.backward()
    assert 0 < loss.item() < 1 and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="background and at least one foreground"):
        SoftIoULoss()(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="one-hot like input"):
        SoftIoULoss()(torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
