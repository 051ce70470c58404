"""The knee study's parts against the thesis and hand-made inputs: the U-Net with contracting-side
dropout, the negative soft Dice, N4 through ITK, the joint centre (measured in mm on the synthetic
knees), the merged map's per-bone split, the maps-to-label conversion and early stopping."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    Resized,
    Spacingd,
)

from bundle_utils import gradient_check
from medseg_monai.bias_field import N4BiasFieldCorrectiond, n4_bias_field
from medseg_monai.data import load_splits
from medseg_monai.handlers import EarlyStopping
from medseg_monai.joint import JointWindowCropd, joint_centre, reference_joint_centre
from medseg_monai.losses import NegativeSoftDiceLoss
from medseg_monai.networks import EncoderDropoutUNet
from medseg_monai.transforms import MapsToLabeld, SplitByNearestLabeld

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


# --- N4 --------------------------------------------------------------------------------------------


def test_n4_removes_a_known_smooth_bias(tmp_path) -> None:
    """A piecewise-constant phantom times a smooth field: N4 flattens the field inside tissue, the
    corrected tissue's coefficient of variation falls, and the cache serves the second call."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (64, 64, 24)), indexing="ij")
    tissue = (x**2 + y**2 < 0.7) & (np.abs(z) < 0.9)
    phantom = np.where(tissue, 100.0, 0.0) + np.where(tissue & (x > 0.3), 40.0, 0.0)
    bias = np.exp(0.35 * x + 0.25 * y)  # 0.55 .. 1.8
    image = (phantom * bias).astype(np.float32)
    field = n4_bias_field(image, (1.0, 1.0, 3.0), shrink_factor=2, iterations=(50, 50, 50))
    region = tissue & (x <= 0.3)

    def cv(a: np.ndarray) -> float:
        return float(a[region].std() / a[region].mean())

    corrected = image / field
    assert cv(image) > 0.15 and cv(corrected) < cv(image) / 3, (cv(image), cv(corrected))
    transform = N4BiasFieldCorrectiond("image", shrink_factor=2, iterations=(50, 50, 50), cache_dir=tmp_path)
    from monai.data import MetaTensor

    item = {
        "image": MetaTensor(
            torch.from_numpy(image)[None], affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
        )
    }
    first = transform(item)["image"]
    assert list(tmp_path.glob("*.npy")) and np.allclose(first[0].numpy(), corrected, rtol=1e-3, atol=1e-3)
    second = transform(item)["image"]
    assert torch.equal(first, second) and isinstance(second, MetaTensor)
    with pytest.raises(ValueError, match="positive iterations"):
        N4BiasFieldCorrectiond("image", iterations=[])


# --- joint centre ----------------------------------------------------------------------------------


def _oriented(case: dict) -> dict:
    load = Compose(
        [
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RSP", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ]
    )
    return load(case)


def test_joint_centre_from_the_image_is_within_a_few_mm_on_every_synthetic_knee() -> None:
    """The image-only detection against the label-derived centre on all 12 synthetic knees (the
    docs quote these figures: mean 2.2 mm, worst 3.6 mm at 0.7 x 0.7 x 3 mm)."""
    parts = load_splits("knee-synthetic")
    errors = []
    for case in parts["train"] + parts["val"]:
        d = _oriented(case)
        spacing = [float(s) for s in d["image"].pixdim]
        found = joint_centre(d["image"][0].numpy(), spacing)
        truth = reference_joint_centre(d["label"][0].numpy())
        errors.append(float(np.hypot(*((np.array(found) - truth) * spacing[:2]))))
    assert len(errors) == 12
    assert np.mean(errors) < 3.0 and max(errors) < 5.0, errors


def test_window_is_centred_on_the_joint_and_inverts_to_the_native_grid() -> None:
    case = load_splits("knee-synthetic")["val"][0]
    d = _oriented(case)
    geometry = Compose(
        [
            Spacingd("image", pixdim=[100 / 64, 100 / 64, -1], mode="bilinear"),
            JointWindowCropd("image", window=(64, 64)),
            Resized("image", spatial_size=[-1, -1, 16]),
        ]
    )
    out = geometry(dict(d))
    assert out["image"].shape == (1, 64, 64, 16)
    # the joint centre of the window's label lies at the window's centre (within the detection error)
    label = Compose([Spacingd("label", pixdim=[100 / 64, 100 / 64, -1], mode="nearest")])(dict(d))["label"]
    start = out["joint_window_start"]
    x, s = reference_joint_centre(label[0].numpy())
    assert abs(x - start[0] - 31.5) * 100 / 64 < 5 and abs(s - start[1] - 31.5) * 100 / 64 < 5
    assert start[2] == 0 and out["joint_window_end"][2] == 36  # no z crop
    back = Invertd("pred", transform=geometry, orig_keys="image", nearest_interp=False)(
        {**out, "pred": out["image"].clone()}
    )["pred"]
    assert back.shape == d["image"].shape and torch.allclose(
        back.affine, d["image"].affine.to(back.affine.dtype)
    )


def test_window_pads_where_it_leaves_the_image() -> None:
    from monai.data import MetaTensor

    img = torch.zeros(1, 40, 60, 4)
    img[0, 5:35, 10:25] = 1.0  # condyles
    img[0, 5:35, 31:50] = 1.0  # plateau; the dark joint band is rows 25-30
    item = {"image": MetaTensor(img, affine=torch.eye(4))}
    out = JointWindowCropd("image", window=(64, 64), band_mm=10, search_mm=8, smooth_mm=1)(item)
    assert out["image"].shape == (1, 64, 64, 4)
    assert out["joint_window_start"][0] < 0 and out["joint_window_end"][0] > 40  # padded in x


# --- merged maps, labels, early stopping ---------------------------------------------------------


def test_merged_prediction_split_by_nearest_reference_bone() -> None:
    label = torch.zeros(1, 1, 10)
    label[0, 0, 1:3] = 1  # femur
    label[0, 0, 6:8] = 2  # tibia
    pred = torch.zeros(1, 1, 10)
    pred[0, 0, [0, 1, 2, 3, 5, 6, 9]] = 1
    out = SplitByNearestLabeld("pred", classes=[1, 2, 3])({"pred": pred, "label": label})["pred"]
    assert out.shape == (3, 1, 10)
    assert out[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert out[1, 0].nonzero().flatten().tolist() == [5, 6, 9]
    assert out[2].sum() == 0  # no fibula in the reference
    empty = SplitByNearestLabeld("pred")({"pred": pred, "label": torch.zeros(1, 1, 10)})["pred"]
    assert empty.sum() == 0


def test_maps_to_label_takes_the_most_probable_bone_above_threshold() -> None:
    maps = torch.tensor([[0.9, 0.6, 0.1, 0.4], [0.2, 0.7, 0.2, 0.3], [0.0, 0.0, 0.3, 0.45]])[:, None]
    label = MapsToLabeld("pred", values=[1, 2, 3])({"pred": maps})["pred"]
    assert label.flatten().tolist() == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="2 maps for 3 label values"):
        MapsToLabeld("pred", values=[1, 2, 3])({"pred": maps[:2]})


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


def test_oai_zib_like_labels_without_fibula_keep_the_bone_channels(tmp_path) -> None:
    """A label with femur and tibia only: the fibula map is empty, not an error."""
    from medseg_monai.transforms import LabelToRegionsd

    label = np.zeros((8, 8, 4), np.uint8)
    label[:, :4] = 1
    label[:, 5:] = 2
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "l.nii.gz")
    d = LoadImaged("label", image_only=True, ensure_channel_first=True)({"label": str(tmp_path / "l.nii.gz")})
    maps = LabelToRegionsd("label", [[1], [2], [3]])(d)["label"]
    assert maps.shape == (3, 8, 8, 4) and maps[2].sum() == 0 and maps[0].sum() == 8 * 4 * 4
