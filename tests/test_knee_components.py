"""The knee study's parts against the thesis and hand-made inputs: the U-Net with contracting-side
dropout, the negative soft Dice, the two fields of view scored (the thesis's window and the whole
scan, counted by hand on a crafted knee) and early stopping. Its transforms (N4, the joint window,
the merged map's per-bone split, maps to labels) are tested with their families in
test_transforms_*.py."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from bundle_utils import gradient_check, parse_study
from medseg_monai.handlers import EarlyStopping
from medseg_monai.losses import NegativeSoftDiceLoss
from medseg_monai.networks import EncoderDropoutUNet

# --- network ---------------------------------------------------------------------------------------


def test_3d_unet_shape_and_gradient_at_the_thesis_size() -> None:
    """36 x 224 x 224 (here 224 x 224 x 36) in, one map per bone out; every weight gets a gradient."""
    torch.manual_seed(0)
    net = EncoderDropoutUNet(features=(4, 8, 16, 32, 64))
    y = gradient_check(net, torch.randn(1, 1, 224, 224, 36))
    assert y.shape == (1, 3, 224, 224, 36)


def test_every_map_starts_at_the_prior() -> None:
    torch.manual_seed(0)
    net = EncoderDropoutUNet(features=(4, 8, 16, 32, 64)).eval()
    p = torch.sigmoid(net(torch.rand(1, 1, 32, 32, 8)))
    assert p.mean().item() == pytest.approx(0.01, rel=0.2) and p.max() < 0.05
    with pytest.raises(ValueError, match="out_prior must be a probability"):
        EncoderDropoutUNet(out_prior=1.0)


def test_2d_variant_on_slices() -> None:
    net = EncoderDropoutUNet(
        spatial_dims=2, out_channels=1, features=(4, 8, 16, 32, 64), strides=[2, 2, 2, 2]
    )
    assert net(torch.randn(36, 1, 224, 224)).shape == (36, 1, 224, 224)
    assert not any(isinstance(m, torch.nn.Conv3d) for m in net.modules())


def test_dropout_only_between_the_contracting_convolutions() -> None:
    net = EncoderDropoutUNet(dropout=0.2)
    for block in net.downs:  # conv, dropout, ReLU | conv, ReLU: dropout sits between the two
        first, second = block
        leaves = [type(m).__name__ for m in first.modules() if not list(m.children())]
        assert leaves == ["Conv3d", "Dropout", "ReLU"]  # in the order they run
        assert [
            type(m).__name__ for m in first.modules() if isinstance(m, (torch.nn.Dropout3d, torch.nn.Dropout))
        ]
        assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d)) for m in second.modules())
        assert [m.p for m in first.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d))] == [
            0.2
        ]
    assert len(net.downs) == 5  # four contracting blocks and the bottom one
    for module in [*net.ups, *net.decoders, net.out]:
        assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d)) for m in module.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    # dropout acts in training only: eval is deterministic, training is not
    x = torch.randn(1, 1, 32, 32, 8)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


def test_dropout_before_relu_equals_the_keras_order_after_it() -> None:
    # the block drops before its ReLU; with the same mask, ReLU then dropout (Keras) is the same
    first = EncoderDropoutUNet(dropout=0.5).downs[0][0].train()
    x = torch.randn(1, 1, 6, 6, 4)
    torch.manual_seed(0)
    ours = first(x)
    torch.manual_seed(0)
    conv = first.conv(x)
    keras = torch.nn.functional.dropout(torch.relu(conv), p=0.5, training=True)
    assert torch.allclose(ours, keras) and (ours == 0).float().mean() > (conv < 0).float().mean()


def test_slice_axis_pools_only_where_the_strides_say() -> None:
    net = EncoderDropoutUNet(features=(2, 4, 8, 16, 32))
    assert [p.kernel_size for p in net.pools] == [(2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1)]
    with pytest.raises(ValueError, match=r"spatial size \(224, 224, 30\) is not divisible by \(16, 16, 4\)"):
        net(torch.randn(1, 1, 224, 224, 30))
    with pytest.raises(ValueError, match="strides must give 4 poolings of 3 values"):
        EncoderDropoutUNet(strides=[(2, 2, 2)])
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        EncoderDropoutUNet(dropout=1.0)


# --- loss ------------------------------------------------------------------------------------------


def test_negative_soft_dice_is_the_pooled_keras_formula() -> None:
    """-(2 sum pt + 1) / (sum p + sum t + 1) over batch, maps and voxels together, by hand."""
    p = torch.tensor([[[0.9, 0.2, 0.6, 0.1]], [[0.3, 0.8, 0.5, 0.5]]]).reshape(1, 2, 4)  # 2 maps, 4 voxels
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]).reshape(1, 2, 4)
    # sum pt = 0.9 + 0.6 + 0.8 = 2.3; sum p = 3.9; sum t = 3
    expected = -(2 * 2.3 + 1) / (3.9 + 3 + 1)
    loss = NegativeSoftDiceLoss(sigmoid=False)(p, t)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    logits = torch.logit(p).requires_grad_()
    NegativeSoftDiceLoss()(logits, t).backward()
    assert torch.isfinite(logits.grad).all()
    perfect = NegativeSoftDiceLoss(sigmoid=False, smooth=0.0)(t, t)
    assert perfect.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="does not match"):
        NegativeSoftDiceLoss()(logits, t[:, :1])


# --- the two fields of view scored ----------------------------------------------------------------


# A crafted knee, 40 x 48 x 4 voxels of 1 mm stored in RSP, scored by the bundle's own validation
# (transforms, postprocessing, metrics, CaseMetrics) with a 16 mm window of 16 x 16 x 4 voxels, so
# that every resampling is the identity and each figure is a count of voxels. Soft tissue 0.3;
# femur 1.0 at x 12-27, s 26-43; tibia 0.8 at x 12-21, s 6-21; fibula 0.6 at x 24-31, s 8-17; the
# dark band between femur and tibia puts the joint at (19.5, 23), the window at x 12-27, s 15-30.
# A network reads each bone from its intensity (pointwise, so sliding windows change nothing), and
# errs inside the window twice: a 2 x 4 x 4 femur-bright patch in soft tissue (32 false femur
# voxels) and tibia rows s 20-21 at 0.7 (80 tibia voxels missed).
_LEVELS = (1.0, 0.8, 0.6)  # femur, tibia, fibula


class _ReadsBoneFromIntensity(torch.nn.Module):
    def __init__(self, merged: bool = False) -> None:
        super().__init__()
        self.merged = merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([((x - v).abs() < 0.05).float() for v in _LEVELS], dim=1)
        if self.merged:
            maps = maps.amax(dim=1, keepdim=True)
        return 20.0 * maps - 10.0


def _crafted_knee(folder: Path) -> dict[str, str]:
    image = np.zeros((40, 48, 4), np.float32)
    label = np.zeros((40, 48, 4), np.uint8)
    image[4:36] = 0.3
    for value, cls, (xs, ss) in zip(
        _LEVELS,
        (1, 2, 3),
        ((slice(12, 28), slice(26, 44)), (slice(12, 22), slice(6, 22)), (slice(24, 32), slice(8, 18))),
        strict=True,
    ):
        image[xs, ss], label[xs, ss] = value, cls
    image[22:24, 16:20] = 1.0  # soft tissue that looks like femur
    image[12:22, 20:22] = 0.7  # tibia the network misses
    rsp = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # x R, s S, z P
    paths = {"image": str(folder / "knee_img.nii.gz"), "label": str(folder / "knee_lab.nii.gz")}
    nib.save(nib.Nifti1Image(image, rsp), paths["image"])
    nib.save(nib.Nifti1Image(label, rsp), paths["label"])
    return {**paths, "case_id": "crafted"}


# (femur, tibia, fibula): window by hand (TP over predicted and labelled voxels inside the window)
# femur 320 TP + 32 FP of 320; tibia 200 TP of 280; fibula 48 TP of 48 (its other 272 lie outside)
_WINDOW_DICE = (640 / 672, 400 / 480, 1.0)
_WINDOW_IOU = (320 / 352, 200 / 280, 1.0)
# the whole scan: the same predictions, and all the bone: femur 1152, tibia 640, fibula 320 voxels
_SCAN_DICE = {16.0: (640 / 1504, 400 / 840, 96 / 368), 24.0: (1152 / 1760, 720 / 1000, 448 / 544)}
_SCAN_IOU = {16.0: (320 / 1184, 200 / 640, 48 / 320)}


@pytest.mark.parametrize("infer_window_mm", [16.0, 24.0, 23.0])
def test_window_figure_ignores_bone_outside_the_window_the_scan_figure_counts_it_missed(
    tmp_path: Path, infer_window_mm: float
) -> None:
    """The thesis's figure (window_*) is scored on the window it trained on, the whole-scan
    figure (dice_*, iou_*) on every voxel of the scan, where bone outside the predicted window is
    missed. A wider inference window (24 mm: x 8-31, s 11-34; 23 mm, odd: x 8-30, s 12-34) sees
    more bone and raises the scan figure, never the window one."""
    parser = parse_study(
        "knee",
        profile="quick",
        dataset="knee-synthetic",
        output_dir=str(tmp_path / "run"),
        window_mm=16.0,
        size=[16, 16, 4],
        infer_window_mm=infer_window_mm,
        intensity=[{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}],  # no N4
        val_datalist=[_crafted_knee(tmp_path)],
    )
    parser["network_def"] = _ReadsBoneFromIntensity()
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    case = evaluator.state.case_metrics["cases"]["crafted"]
    for bone, dice, iou in zip(("femur", "tibia", "fibula"), _WINDOW_DICE, _WINDOW_IOU, strict=True):
        assert case[f"window_dice_{bone}"] == pytest.approx(dice, abs=1e-6), bone
        assert case[f"window_iou_{bone}"] == pytest.approx(iou, abs=1e-6), bone
    assert case["window_dice"] == pytest.approx(sum(_WINDOW_DICE) / 3, abs=1e-6)
    if infer_window_mm in _SCAN_DICE:
        for bone, dice in zip(("femur", "tibia", "fibula"), _SCAN_DICE[infer_window_mm], strict=True):
            assert case[f"dice_{bone}"] == pytest.approx(dice, abs=1e-6), bone
        assert case["dice"] == pytest.approx(sum(_SCAN_DICE[infer_window_mm]) / 3, abs=1e-6)
    for bone, iou in zip(("femur", "tibia", "fibula"), _SCAN_IOU.get(infer_window_mm, ()), strict=False):
        assert case[f"iou_{bone}"] == pytest.approx(iou, abs=1e-6), bone
    if infer_window_mm == 23.0:  # tibia s 12-21 less the 80 missed, fibula x 24-30, s 12-17
        assert case["dice_tibia"] == pytest.approx(640 / 960, abs=1e-6)
        assert case["dice_fibula"] == pytest.approx(336 / 488, abs=1e-6)
    assert evaluator.state.case_metrics["mean"]["window_dice_femur"] == case["window_dice_femur"]


def test_merged_map_is_scored_in_the_window_and_on_the_scan(tmp_path: Path) -> None:
    """One bone map: its own Dice (union of the bones: 568 TP of 600 predicted, 648 labelled in
    the window, 2112 in the scan) and per bone by the nearest reference bone, in each field of view
    on its own reference (the femur's predicted voxels are all femur: 320 of 320 in the window)."""
    parser = parse_study(
        "knee",
        "merged",
        "quick",
        dataset="knee-synthetic",
        output_dir=str(tmp_path / "run"),
        window_mm=16.0,
        size=[16, 16, 4],
        intensity=[{"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0}],
        val_datalist=[_crafted_knee(tmp_path)],
    )
    parser["network_def"] = _ReadsBoneFromIntensity(merged=True)
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    case = evaluator.state.case_metrics["cases"]["crafted"]
    assert case["window_dice"] == pytest.approx(1136 / 1248, abs=1e-6)
    assert case["dice"] == pytest.approx(1136 / 2712, abs=1e-6)
    assert case["window_dice_femur"] == pytest.approx(1.0, abs=1e-6)
    assert case["dice_femur"] == pytest.approx(640 / 1472, abs=1e-6)


# --- early stopping -------------------------------------------------------------------------------


def _scored_trainer(scores: list[float], patience: int) -> Engine:
    """A trainer validating after every epoch with an evaluator that reports ``scores`` in turn."""
    values = iter(scores)
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.COMPLETED)
    def _metric(engine: Engine) -> None:
        engine.state.metrics = {"val_dice": next(values)}
        engine.state.key_metric_name = "val_dice"

    trainer = Engine(lambda e, b: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    EarlyStopping(evaluator, patience=patience).attach(trainer)
    return trainer


def test_early_stopping_stops_after_patience_and_resumes_its_count() -> None:
    trainer = _scored_trainer([0.1, 0.3, 0.2, 0.25, 0.29, 0.5], patience=3)
    trainer.run([0], max_epochs=20)
    assert trainer.state.epoch == 5  # best 0.3 at epoch 2, then three worse: stop after epoch 5
    saved = trainer.state_dict()
    assert saved["early_stopping"]["counter"] == 3 and saved["early_stopping"]["best_score"] == 0.3
    # resumed with patience 4 from that checkpoint: one more worse validation is the fourth
    resumed = _scored_trainer([0.28, 0.9], patience=4)
    resumed.load_state_dict(saved)
    resumed.run([0], max_epochs=20)
    assert resumed.state.epoch == 6
    with pytest.raises(ValueError, match="patience must be a positive"):
        EarlyStopping(Engine(lambda e, b: None), patience=0)
