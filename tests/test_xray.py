"""X-ray bundle: losses against their formulas, configs, the real-data recipe's input, and the quick
profile end to end (the noise transforms are tested in test_transforms_intensity.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceLoss
from PIL import Image

from bundle_utils import ROOT, error_lines, metric_values, mlflow_client, parse_study, run_bundle, train_quick
from medseg_monai.losses import ForegroundBackgroundDiceLoss, SumOfLosses
from medseg_monai.networks import ClassicUNet
from medseg_monai.reproduce import plan

CONFIGS = ROOT / "bundles" / "xray" / "configs"


def _parser(experiment: str | None = None, profile: str | None = None, **overrides: object) -> ConfigParser:
    # the registry entry 'jsrt-scr' only: nothing is read
    return parse_study("xray", experiment, profile, **{"dataset": "jsrt-scr", **overrides})


# --- losses ---------------------------------------------------------------------------------------


def _probs() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor([[[[0.9, 0.2], [0.6, 0.1]], [[0.1, 0.8], [0.4, 0.9]]]])  # (1, 2, 2, 2), sums to 1
    r = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    return p, r


def test_dl2_against_its_formula() -> None:
    p, r = _probs()
    eps = 1e-6
    expected = []
    for c in range(2):
        pc, rc = p[:, c].flatten(), r[:, c].flatten()
        fg = ((pc * rc).sum() + eps) / ((pc + rc).sum() + eps)
        bg = (((1 - pc) * (1 - rc)).sum() + eps) / ((2 - pc - rc).sum() + eps)
        expected.append(1 - fg - bg)
    loss = ForegroundBackgroundDiceLoss(to_onehot_y=False, softmax=False)(p, r)
    assert loss.item() == pytest.approx(float(torch.stack(expected).mean()), abs=1e-6)
    # by hand for class 0: p = (.9, .2, .6, .1), r = (1, 0, 1, 0): fg = 1.5 / 3.8, bg = 1.7 / 4.2
    assert float(expected[0]) == pytest.approx(1 - 1.5 / 3.8 - 1.7 / 4.2, abs=1e-5)
    assert ForegroundBackgroundDiceLoss(to_onehot_y=False, softmax=False)(r, r).item() == pytest.approx(
        0, abs=1e-6
    )


def test_dl2_from_logits_and_indices_has_gradients() -> None:
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    loss = ForegroundBackgroundDiceLoss()(logits, target)
    loss.backward()
    assert 0 < loss.item() < 1 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bundle_loss_is_cross_entropy_plus_multiclass_soft_dice() -> None:
    # the poster's loss as train.yaml configures it: softmax over 3 classes, one-hot indices,
    # cross-entropy + soft Dice averaged over every class (background included), batch pooled
    loss = _parser().get_parsed_content("loss")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=gen)
    target = torch.randint(0, 3, (2, 1, 4, 4), generator=gen)
    p = torch.softmax(logits, dim=1)
    r = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    ce = -(r * torch.log(p)).sum(dim=1).mean()
    eps = 1e-5  # MONAI's smoothing of numerator and denominator
    dice = [
        1 - (2 * (p[:, c] * r[:, c]).sum() + eps) / (p[:, c].sum() + r[:, c].sum() + eps) for c in range(3)
    ]
    assert loss(logits, target).item() == pytest.approx(float(ce + torch.stack(dice).mean()), abs=1e-5)


def test_sum_of_losses_weights() -> None:
    p, r = _probs()
    a, b = ForegroundBackgroundDiceLoss(to_onehot_y=False, softmax=False), DiceLoss(batch=True)
    total = SumOfLosses([a, b], [2.0, 0.5])(p, r)
    assert total.item() == pytest.approx(2 * a(p, r).item() + 0.5 * b(p, r).item(), abs=1e-6)


def test_classic_unet_shape_and_gradients() -> None:
    net = ClassicUNet(in_channels=1, out_channels=3, features=(8, 16, 32, 64, 128))
    x = torch.randn(2, 1, 64, 48, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, 64, 48)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    # every up-step halves the channels, as in the reference implementation
    assert net.upcat_1.upsample.deconv.out_channels == 8
    assert sum(p.numel() for p in ClassicUNet(out_channels=2).parameters()) == pytest.approx(
        31.04e6, rel=0.01
    )


# --- configs --------------------------------------------------------------------------------------


def test_experiment_grid_is_complete() -> None:
    jobs = {j.experiment: j for j in plan("quick", studies=["xray"])}
    sizes = {f"train_size_{n:03d}": n for n in (5, 10, 15, 20, 25, 45, 65, 85, 105)}
    assert {"baseline", "noise_train_val", "noise_val_only", "cpu_real", *sizes} == set(jobs)
    assert not jobs["cpu_real"].paper and "beyond the poster" in jobs["cpu_real"].note  # not a poster number
    for name, n in sizes.items():  # the sweep: the baseline with one training-set size each
        assert jobs[name].overrides == {"train_size": n, "experiment": name}
        assert jobs[name].configs[1].endswith("experiments/baseline.yaml")
    assert jobs["train_size_005"].paper == {"dice": 0.98667}
    noisy = _parser("noise_train_val")
    assert (noisy["train_noisy_copies"], noisy["val_noisy_copies"], noisy["max_epochs"]) == (1, 1, 200)
    assert (
        _parser("noise_val_only")["train_noisy_copies"],
        _parser("noise_val_only")["val_noisy_copies"],
    ) == (0, 1)
    assert _parser("noise_train_val", "quick")["max_epochs"] == 12  # the quick profile stays quick


def _images(dataset: object) -> dict[str, torch.Tensor]:
    return {item["case_id"]: item["image"] for item in (dataset[i] for i in range(len(dataset)))}


@pytest.mark.parametrize(
    ("experiment", "train_copies", "val_copies"),
    [("noise_train_val", True, True), ("noise_val_only", False, True)],
)
def test_noise_experiments_add_noisy_copies_to_clean_originals(
    experiment: str, train_copies: bool, val_copies: bool
) -> None:
    # poster, exp. 2: the originals plus newly transformed noisy copies; exp. 3: 60 clean + 60 noisy validation images
    kw = {"dataset": "xray-synthetic", "cache_rate": 0.0}
    base, noisy = _parser(None, "quick", **kw), _parser(experiment, "quick", **kw)
    cases = base.get_parsed_content("cases")
    # training: the quick profile's 20 training images (train_size); validation and evaluate's
    # datalist: every case of the part
    originals = {"train": base.get_parsed_content("train_datalist"), "val": cases["val"]}

    def with_copies(items: list[dict], copies: bool) -> list[str]:
        ids = [c["case_id"] for c in items]
        return ids + [f"{i}_noisy" for i in ids] if copies else ids

    for part, copies in (("train", train_copies), ("val", val_copies)):
        expected = with_copies(originals[part], copies)
        listed = noisy.get_parsed_content("train_datalist" if part == "train" else "val_datalist")
        assert [c["case_id"] for c in listed] == expected
        n = len(originals[part])
        assert [c["noisy"] for c in listed] == [0] * n + [1] * (len(expected) - n)
        assert [c["case_id"] for c in noisy.get_parsed_content("datalist")[part]] == with_copies(
            cases[part], copies
        )  # evaluate's too
    if experiment != "noise_train_val":
        return  # the images of the copies: once is enough (loading takes seconds)
    kw["train_size"] = 3
    noisy, base = _parser(experiment, "quick", **kw), _parser(None, "quick", **kw)
    train, clean_train = (_images(p.get_parsed_content("train_dataset")) for p in (noisy, base))
    val, clean_val = (_images(p.get_parsed_content("validate#dataset")) for p in (noisy, base))
    assert (len(train), len(clean_train), len(val), len(clean_val)) == (6, 3, 24, 12)
    for images, clean in ((train, clean_train), (val, clean_val)):
        for cid, image in clean.items():
            assert torch.equal(images[cid], image)  # the originals stay clean
            # sigma 5000 on the 16-bit scale (a little less: clipped to [0, 1])
            sigma = float((images[f"{cid}_noisy"] - image).std()) * 65535
            assert 4000 < sigma < 5100, sigma
    # fixed: the copy is the same whenever it is made (the cache keeps it; a rebuild agrees)
    rebuilt = _parser(experiment, "quick", **kw).get_parsed_content("validate#dataset")
    assert torch.equal(rebuilt[len(rebuilt) - 1]["image"], val[rebuilt[len(rebuilt) - 1]["case_id"]])


def test_default_is_the_posters_baseline() -> None:
    p = _parser()
    net = p.get_parsed_content("network_def")
    assert isinstance(net, ClassicUNet) and net.final_conv.out_channels == 3
    opt = p.get_parsed_content("optimizer")
    assert isinstance(opt, torch.optim.RMSprop)
    assert (opt.defaults["lr"], opt.defaults["weight_decay"], opt.defaults["momentum"]) == (1e-5, 1e-8, 0.999)
    sched = p.get_parsed_content("lr_scheduler")
    assert (sched.mode, sched.patience) == ("max", 5) and p["key_metric_mode"] == "max"
    assert p.get_parsed_content("noise_sigma_16bit") == 5000 and p["max_epochs"] == 50
    assert (p["train_noisy_copies"], p["val_noisy_copies"]) == (0, 0)
    # as the reference implementation: validation, and the plateau scheduler, 5 times an epoch
    targets = [h["_target_"] for h in p["train#handlers"]]
    validation = p["train#handlers"][targets.index("medseg_monai.handlers.ValidationSchedule")]
    assert validation["per_epoch"] == "@validations_per_epoch" and p["validations_per_epoch"] == 5
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "lungs",
        "2": "heart",
    }


def test_image_size_must_suit_the_network() -> None:
    """The classic U-Net pads any size; cpu_real's five-stride U-Net needs multiples of 32, which the
    quick profile rounds its 48 px up to, and a size that does not divide is refused in one line."""
    from medseg_monai.errors import is_input_error

    assert parse_study("xray", profile="quick", image_size=50).get_parsed_content("image_shape") == [50, 50]
    assert parse_study("xray", profile="quick").get_parsed_content("image_shape") == [48, 48]
    assert parse_study("xray", "cpu_real", "quick").get_parsed_content("image_shape") == [64, 64]
    with pytest.raises(Exception) as caught:
        parse_study("xray", "cpu_real", image_size=300).get_parsed_content("image_shape")
    assert (
        str(is_input_error(caught.value))
        == "image_size 300 is not a multiple of 32 (this network's): use 288 or 320"
    )


def test_cpu_real_xray_input_is_the_same_picture_whatever_grey_range_the_file_used(
    shared_data: Path, tmp_path: Path
) -> None:
    """A shared JSRT image stored at 239-254 of 255 (as unseen JSRT files are, issue #37) reaches
    the cpu_real recipe's network as nearly the picture its original gives; the poster's fixed
    bit-depth scaling hands the network a nearly white image instead."""
    import runpy
    import sys

    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[1]
    argv = sys.argv
    try:
        sys.argv = ["x", "--data_root", str(shared_data / "jsrt-scr"), "--output", str(tmp_path / "narrow")]
        runpy.run_path(str(root / "bundles/xray/docs/narrow_range.py"), run_name="__main__")
    finally:
        sys.argv = argv
    name = "JPCLN001.IMG.png"
    configs = root / "bundles/xray/configs"

    def network_input(experiment: list[Path], image: Path) -> torch.Tensor:
        parser = ConfigParser()
        parser.read_config([configs / "train.yaml", *experiment])
        parser.update({"dataset": "jsrt-scr", "image_size": 320})
        return parser.get_parsed_content("infer_preprocessing")({"image": str(image)})["image"].as_tensor()

    for experiment, close in (([configs / "experiments/cpu_real.yaml"], True), ([], False)):
        original = network_input(experiment, shared_data / "jsrt-scr/images" / name)
        narrowed = network_input(experiment, tmp_path / "narrow/images" / name)
        correlation = torch.corrcoef(torch.stack([original.flatten(), narrowed.flatten()]))[0, 1].item()
        difference = (original - narrowed).abs().mean().item()
        if close:
            assert correlation > 0.99 and difference < 0.03, (correlation, difference)
        else:  # the poster's scaling: the same structures within 6 % of the scale, near white
            assert narrowed.min() > 0.9 and narrowed.max() - narrowed.min() < 0.07
            assert original.max() - original.min() > 0.5


# --- the bundle end to end (quick profile) ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One quick-profile training on synthetic radiographs, shared by the tests below, validated as the
    reference implementation validates (5 times an epoch; the quick profile validates once)."""
    return train_quick(
        "xray", tmp_path_factory, dataset="xray-synthetic", seed=1, validations_per_epoch=5, lr_patience=25
    )


@pytest.mark.slow
def test_quick_profile_trains_and_improves(trained: tuple[Path, Path]) -> None:
    out, store = trained
    for name in ("model.pt", "model_final.pt", "config.json", "datalist.json", "run.json", "val_overlay.png"):
        assert (out / name).is_file(), name
    client = mlflow_client(store)
    run = client.search_runs([client.get_experiment_by_name("xray").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "baseline seed1 (quick)"
    assert run.data.tags["dataset.kind"] == "synthetic" and run.data.tags["profile"] == "quick"
    dice = metric_values(client, run.info.run_id, "val_dice")
    assert len(dice) == 12
    assert max(dice[-3:]) > dice[0] + 0.25 and max(dice) > 0.6, dice
    # 5 validations an epoch (5 iterations: after each); model.pt is the best of them all
    by_iteration = client.get_metric_history(run.info.run_id, "val_dice_by_iteration")
    assert sorted(m.step for m in by_iteration) == list(range(1, 61))
    best = torch.load(out / "checkpoint.pt", weights_only=False)["best_metric"]
    assert best == pytest.approx(max(m.value for m in by_iteration), abs=1e-5) and best > max(dice) - 1e-5
    assert {"val_dice_lungs", "val_dice_heart", "train_loss", "lr"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "run.json", "datalist.json", "val_overlay.png", "model.pt"} <= artifacts


@pytest.mark.slow
def test_evaluate_a_real_folder_at_original_resolution(trained: tuple[Path, Path], shared_data: Path) -> None:
    out, store = trained
    # a real JSRT folder: --split all --data_root <folder> --ckpt_path
    real = run_bundle(
        "xray",
        store,
        mode="evaluate",
        dataset="jsrt-scr",
        data_root=shared_data / "jsrt-scr",
        split="all",
        ckpt_path=out / "model.pt",
        output_dir=out / "eval-jsrt",
    )
    assert real.returncode == 0, real.stderr[-3000:]
    metrics = json.loads((out / "eval-jsrt" / "metrics.json").read_text())
    assert len(metrics["cases"]) == 40
    assert {"dice", "dice_lungs", "dice_heart", "iou", "iou_lungs", "iou_heart"} <= set(metrics["mean"])
    # the overlay shows the image as read (2048 px), not the network's input
    assert Image.open(out / "eval-jsrt" / "eval_all_overlay.png").size[1] >= 2048


@pytest.mark.slow
def test_inference_keeps_each_inputs_size(
    trained: tuple[Path, Path], tmp_path: Path, shared_data: Path
) -> None:
    out, store = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (300, 420), dtype=np.uint16)).save(
        inputs / "wide16.png"
    )
    shutil.copy(shared_data / "jsrt-scr" / "images" / "JPCLN001.IMG.png", inputs / "JPCLN001.IMG.png")
    result = run_bundle(
        "xray",
        store,
        mode="inference",
        input_path=inputs,
        ckpt_path=out / "model.pt",
        output_dir=tmp_path / "pred",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name, size in (("wide16", (420, 300)), ("JPCLN001", (2048, 2048))):
        label = Image.open(tmp_path / "pred" / f"{name}_label.png")
        assert label.size == size and set(np.unique(np.array(label))) <= {0, 1, 2}
        assert Image.open(tmp_path / "pred" / f"{name}_overlay.png").size == size


def _jsrt_copy(shared_data: Path, dest: Path, cases: int = 6) -> Path:
    src = shared_data / "jsrt-scr"
    names = sorted(p.name.split(".")[0] for p in (src / "images").iterdir())[:cases]
    for name in names:
        (dest / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "images" / f"{name}.IMG.png", dest / "images")
        for s in ("heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle"):
            (dest / "masks" / s).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "masks" / s / f"{name}.gif", dest / "masks" / s)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing_mask", "aspect_ratio", "mask_sizes", "unreadable"])
def test_bad_input_is_one_line_and_nonzero(shared_data: Path, tmp_path: Path, fault: str) -> None:
    root = _jsrt_copy(shared_data, tmp_path / "jsrt")
    if fault == "missing_mask":
        (root / "masks" / "heart" / "JPCLN002.gif").unlink()
        expected = "case 'JPCLN002' is missing its 'heart' mask"
    elif fault == "aspect_ratio":
        for s in ("heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle"):
            Image.new("L", (1024, 700)).save(root / "masks" / s / "JPCLN002.gif")
        expected = "JPCLN002.gif: size (1024, 700) does not have the aspect ratio of its image"
    elif fault == "mask_sizes":
        Image.new("L", (1024, 700)).save(root / "masks" / "heart" / "JPCLN002.gif")
        expected = "heart/JPCLN002.gif: mask size (1024, 700) differs from (1024, 1024)"
    else:
        (root / "images" / "JPCLN002.IMG.png").write_bytes(b"not a png")
        expected = "JPCLN002.IMG.png: cannot read this file (UnidentifiedImageError"
    result = run_bundle(
        "xray",
        tmp_path / "mlflow",
        dataset="jsrt-scr",
        data_root=root,
        output_dir=tmp_path / "o",
        max_epochs=1,
    )
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout  # the log says it in one line too
    store = tmp_path / "mlflow" / "mlflow.db"
    if store.exists():  # a run, if one was opened, must not be left FINISHED
        client = mlflow_client(tmp_path / "mlflow")
        exp = client.get_experiment_by_name("xray")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        assert all(r.info.status != "FINISHED" for r in runs)
