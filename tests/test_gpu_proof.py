"""make gpu-proof on a CPU: the refusal, the plan, the figures' functions at tiny sizes, the JSON and
the table, so the script a lent GPU runs once is known to work before it gets there."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer

from medseg_monai.bench import inference_throughput
from medseg_monai.gpu_proof import (
    PART_WEIGHTS,
    BusySampler,
    Deadline,
    amp_agreement,
    busy_summary,
    cudnn_as_bundle,
    evaluate_targets,
    exact_fp32,
    main,
    phantom,
    prove_study,
    segment,
    segmentation_dice,
    steps_to_fill,
    study_plan,
    table,
    training_burst,
    volume_seconds,
    write_results,
)
from medseg_monai.paths import project_root

# what the device machine lacks and docs/gpu-proof.md does not carry (its image has torch, numpy,
# scipy, scikit-image, pandas, matplotlib, pillow, pyyaml, tqdm; the wheels: monai, pytorch-ignite,
# jsonschema and its three)
NOT_ON_DEVICE = [
    "mlflow",
    "SimpleITK",
    "optuna",
    "submitit",
    "fire",
    "git",
    "sqlalchemy",
    "alembic",
    "itk",
    "nibabel",
]

_ON_A_BARE_DEVICE = """
import importlib.abc, json, os, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError(f"not on the device: {{name}}", name=name)
sys.meta_path.insert(0, Block())
from medseg_monai.gpu_proof import STUDIES, bundle_parts, main, settings
built = {{}}
for study in STUDIES:
    parts, activation = bundle_parts(study, settings(study))
    built[study] = [activation, type(parts["val_inferer"]).__name__]
print(json.dumps(built), flush=True)
sys.exit(main(["--output", {output!r}]))
"""


def test_on_a_cpu_with_only_the_carried_packages_bundles_build_and_the_proof_refuses_in_one_line(
    tmp_path,
) -> None:
    """The recipe's carry list is enough: every bundle's parts build at the paper's settings with
    the packages the device lacks blocked and no data (no dataset generated, no N4 run: the
    evaluator the knee's EarlyStopping watches is one that never runs); then, with no CUDA GPU,
    the command refuses in one line, exit status 2, nothing written."""
    output = tmp_path / "proof.json"
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "MEDSEG_CACHE": str(cache),
        "MEDSEG_DATA_ROOT": str(tmp_path / "no-data"),
    }
    code = _ON_A_BARE_DEVICE.format(blocked=set(NOT_ON_DEVICE), output=str(output))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout.splitlines()[0]) == {
        "brats": ["softmax", "SlidingWindowInferer"],
        "knee": ["sigmoid", "SlidingWindowInferer"],
        "wmh": ["sigmoid", "NeighbourSliceInferer"],
        "lv": ["softmax", "SimpleInferer"],
        "xray": ["softmax", "SimpleInferer"],
    }
    assert len(done.stdout.splitlines()) == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the GPU proof needs a CUDA GPU"), done.stderr
    assert not output.exists() and not cache.exists()


def test_budget_must_leave_room_before_the_hard_stop(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--budget", "600", "--hard-stop", "540"])
    assert exit_.value.code == 2
    assert "error: want 0 < --budget < --hard-stop, got 600 and 540" in capsys.readouterr().err


def test_makefile_runs_the_module() -> None:
    makefile = (project_root() / "Makefile").read_text()
    assert "gpu-proof:" in makefile and "-m medseg_monai.gpu_proof" in makefile
    assert "gpu-proof" in makefile.split(".PHONY:")[1].splitlines()[0]


# ----------------------------------------------------------------------------- the plan


def test_the_plan_shares_what_is_left_among_the_studies_then_by_part() -> None:
    plan = study_plan(480, 5, reserve_s=30)  # (480 - 30) / 5 = 90 s a study
    assert plan == pytest.approx(
        {
            "bench_fast_off": 18,
            "bench_fast_on": 18,
            "burst": 27,
            "amp_check": 4.5,
            "inference": 13.5,
            "volume": 9,
        }
    )
    assert sum(plan.values()) == pytest.approx(90)
    assert set(plan) == set(PART_WEIGHTS)
    assert sum(study_plan(20, 2, reserve_s=30).values()) == 0  # less than the reserve: minimum steps only


def test_a_study_finishing_early_leaves_its_time_to_the_later_ones() -> None:
    now = [1000.0]
    deadline = Deadline(480, clock=lambda: now[0])
    assert deadline.left() == 480 and not deadline.over()
    now[0] += 30  # the first of five studies took 30 s of its 93
    assert deadline.elapsed() == 30
    assert sum(study_plan(deadline.left(), 4, reserve_s=15).values()) == pytest.approx((450 - 15) / 4)
    now[0] += 450
    assert deadline.left() == 0 and deadline.over()


@pytest.mark.parametrize(
    ("slice_s", "per_step_s", "expected"),
    [(30, 0.5, 40), (3, 0.5, 6), (1, 0.5, 3), (5, 0.0, 40), (0.0, 2.0, 3), (30, float("inf"), 3)],
)
def test_steps_fill_the_slice_within_bounds(slice_s, per_step_s, expected) -> None:
    assert steps_to_fill(slice_s, per_step_s, lo=3, hi=40) == expected


# ----------------------------------------------------------------------------- the synthetic case


def test_phantom_nests_the_classes_and_tells_them_apart_by_intensity() -> None:
    image, label = phantom([2, 2, 9, 9], [2, 1, 9, 9], classes=3, seed=0)
    assert image.shape == (2, 2, 9, 9) and label.shape == (2, 1, 9, 9)
    assert set(label.unique().tolist()) == {0.0, 1.0, 2.0}
    # the centres move by at most 0.1 of the half-extent: the middle voxel is the innermost class,
    # the corners (radius > 1.2) background
    assert (label[:, 0, 4, 4] == 2).all() and (label[:, 0, [0, 0, 8, 8], [0, 8, 0, 8]] == 0).all()
    means = [image[:, 0][label[:, 0] == k].mean() for k in range(3)]
    assert means[0] < means[1] < means[2]
    assert image[:, 1].mean() > image[:, 0].mean()  # contrast grows with the channel
    again, _ = phantom([2, 2, 9, 9], [2, 1, 9, 9], classes=3, seed=0)
    other, _ = phantom([2, 2, 9, 9], [2, 1, 9, 9], classes=3, seed=1)
    assert torch.equal(image, again) and not torch.equal(image, other)


def test_phantom_gives_several_maps_apart_for_multi_label_studies() -> None:
    _, label = phantom([1, 1, 33, 9, 9], [1, 3, 33, 9, 9], classes=2)
    assert set(label.unique().tolist()) == {0.0, 1.0}
    assert (label.sum((2, 3, 4)) > 0).all()  # every map holds a structure
    assert label.sum(1).max() == 1  # and they do not touch


# ----------------------------------------------------------------------------- the figures


def test_dice_between_segmentations_by_hand() -> None:
    a = torch.tensor([[0, 1], [2, 2]])
    b = torch.tensor([[0, 1], [2, 0]])
    assert segmentation_dice(a, b) == pytest.approx(2 * 2 / (3 + 2))
    assert segmentation_dice(a, a) == 1.0
    assert segmentation_dice(torch.tensor([1, 1]), torch.tensor([2, 2])) == 0.0  # another class is no match
    assert segmentation_dice(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == 1.0
    masks = torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])
    assert segmentation_dice(*masks) == pytest.approx(2 * 1 / (2 + 2))
    with pytest.raises(ValueError, match="differ in shape or type"):
        segmentation_dice(a, b.bool())


class _Fixed(torch.nn.Module):
    """A network whose output is ``out`` whatever it is given."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def test_segment_takes_the_first_maximum_or_a_positive_logit() -> None:
    logits = torch.tensor([[[0.1, 2.0], [0.5, -1.0], [0.5, 0.0]]])  # (1, 3 classes, 2 voxels)
    assert segment(_Fixed(logits), SimpleInferer(), torch.zeros(1), "softmax", amp=False).tolist() == [[1, 0]]
    maps = torch.tensor([[[0.3, -0.2], [0.0, 1.0]]])  # (1, 2 maps, 2 voxels)
    got = segment(_Fixed(maps), SimpleInferer(), torch.zeros(1), "sigmoid", amp=False)
    assert got.tolist() == [[[True, False], [False, True]]]


def _tiny_net(channels: int = 1, classes: int = 3, dims: int = 2) -> torch.nn.Module:
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    torch.manual_seed(0)
    return torch.nn.Sequential(conv(channels, 8, 3, padding=1), torch.nn.ReLU(), conv(8, classes, 1))


def test_amp_agreement_compares_the_amp_segmentation_with_exact_fp32() -> None:
    net = _tiny_net()
    volume = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    parts = {"network": net, "val_inferer": SimpleInferer()}
    out = amp_agreement(parts, volume, "softmax")
    mixed = segment(net, SimpleInferer(), volume, "softmax", amp=True)  # bfloat16 on a CPU
    reference = segment(net, SimpleInferer(), volume, "softmax", amp=False)
    assert out["amp_dice"] == segmentation_dice(mixed, reference)
    assert out["voxels_differing"] == int((mixed != reference).sum())
    assert out["foreground_fraction"] == pytest.approx(float((reference > 0).float().mean()))
    assert 0 < out["foreground_fraction"] < 1 and out["amp_call_s"] > 0


def test_precision_and_cudnn_settings_are_restored() -> None:
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    with exact_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with cudnn_as_bundle(True):
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    with cudnn_as_bundle(False):
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert saved == (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )


def test_sliding_window_is_timed_against_a_forward_over_the_same_windows() -> None:
    parts = {
        "network": _tiny_net(),
        "device": torch.device("cpu"),
        "amp": False,
        "val_inferer": SlidingWindowInferer(roi_size=(8, 8), sw_batch_size=1, overlap=0),
    }
    out = inference_throughput(parts, torch.randn(1, 1, 16, 24), steps=4, warmup=1)
    assert out["inference_windows"] == 2 * 3  # 16 x 24 in 8 x 8 windows, no overlap
    assert out["inference_efficiency"] == pytest.approx(
        out["forward_s_per_call"] / out["inference_s_per_call"]
    )


def test_volume_seconds_is_the_median_of_its_repeats() -> None:
    parts = {"network": _tiny_net(), "device": torch.device("cpu"), "val_inferer": SimpleInferer()}
    out = volume_seconds(parts, torch.randn(1, 1, 16, 16), "softmax", repeats=3)
    assert len(out["volume_s_each"]) == 3 and out["volume_s"] == statistics.median(out["volume_s_each"])
    assert out["input_shape"] == [1, 1, 16, 16] and out["peak_memory_mb"] > 0


def test_busy_summary_drops_the_readings_before_nvml_settles() -> None:
    readings = [(0.5, 10.0), (1.2, 95.0), (1.5, 85.0), (2.0, 90.0)]
    assert busy_summary(readings, settle_s=1.0) == {
        "gpu_busy_percent": 90.0,
        "gpu_busy_min": 85.0,
        "gpu_busy_readings": 3,
    }
    assert busy_summary(readings, settle_s=1.4)["gpu_busy_percent"] is None  # two readings say nothing


def test_busy_sampler_reads_in_a_thread_until_stopped() -> None:
    count = [0]

    def read() -> float:
        count[0] += 1
        return float(count[0])

    sampler = BusySampler(read, every=0.01)
    sampler.start()
    time.sleep(0.2)
    samples = sampler.stop()
    time.sleep(0.05)
    assert count[0] == len(samples) >= 3  # no reading after stop
    assert [v for _, v in samples] == [float(i) for i in range(1, len(samples) + 1)]
    assert all(t1 < t2 for (t1, _), (t2, _) in zip(samples, samples[1:], strict=False))


class _Slow(torch.nn.Module):
    """A 1x1 convolution that takes 10 ms a call: a burst that lasts long enough to be sampled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        return self.conv(x)


def _parts(net: torch.nn.Module) -> dict:
    from monai.losses import DiceLoss

    return {
        "network": net,
        "loss": DiceLoss(to_onehot_y=True, softmax=True),
        "optimizer": torch.optim.Adam(net.parameters(), lr=1e-2),
        "train_handlers": [],
        "device": torch.device("cpu"),
        "amp": False,
    }


def test_training_burst_samples_busy_after_two_steps_and_stops_at_the_deadline() -> None:
    images, labels = phantom([1, 1, 8, 8], [1, 1, 8, 8], classes=2)
    torch.manual_seed(0)
    out = training_burst(
        _parts(_Slow()), images, labels, 10, Deadline(60), lambda: 95.0, settle_s=0.0, every=0.005
    )
    assert out["steps"] == 10 and out["timed_steps"] == 8
    assert out["gpu_busy_percent"] == 95.0 and out["gpu_busy_readings"] >= 3
    assert out["s_per_step"] == pytest.approx(out["seconds"] / 8) and out["s_per_step"] >= 0.01
    assert out["loss_last"] < out["loss_first"]  # it trains: the AMP check then runs on what it learned
    spent = Deadline(0.0)  # the deadline is checked after every step
    assert training_burst(_parts(_Slow()), images, labels, 10, spent, None)["steps"] == 1
    # and its own limit: steps of at least 10 ms stop by the third, the first to end past 25 ms
    capped = training_burst(_parts(_Slow()), images, labels, 10, Deadline(60), None, max_s=0.025)
    assert capped["steps"] <= 3


# ----------------------------------------------------------------------------- one study, the JSON


TINY = {
    "overrides": {},
    "unit": "volumes",
    "train": {"image": [1, 2, 8, 8, 8], "label": [1, 1, 8, 8, 8], "classes": 3},
    "inference": {"image": [1, 2, 16, 16, 8], "per": 1},
}


def test_a_study_runs_every_part_at_tiny_size_and_the_json_and_table_hold_them(tmp_path) -> None:
    from monai.losses import DiceCELoss

    net = _tiny_net(channels=2, dims=3)
    parts = {
        "network": net,
        "loss": DiceCELoss(to_onehot_y=True, softmax=True),
        "optimizer": torch.optim.Adam(net.parameters(), lr=1e-2),
        "train_handlers": [],
        "device": torch.device("cpu"),
        "amp": False,
        "val_inferer": SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1, overlap=0),
    }
    lines: list[str] = []
    entry = prove_study(
        "brats", TINY, parts, "softmax", Deadline(60), study_plan(0.5, 1, 0), log=lines.append
    )
    parts_run = ["bench_fast_off", "bench_fast_on", "burst", "amp_check", "inference", "volume"]
    assert entry["errors"] == {} and entry["skipped"] == {}
    assert all(part in entry for part in parts_run) and len(lines) == len(parts_run)
    assert entry["inference"]["inference_windows"] == 4 and entry["inferer"] == "SlidingWindowInferer"
    assert entry["burst"]["gpu_busy_percent"] is None  # no GPU, no reading
    assert entry["volume"]["s_per_input"] == entry["volume"]["volume_s"]

    results = {"gpu": None, "studies": {"brats": entry}}
    path = tmp_path / "out" / "proof.json"
    write_results(path, results)
    written = json.loads(path.read_text())
    assert written["all_met"] is False  # GPU busy was not measured
    assert [(t["target"], t["met"]) for t in written["targets"]][0] == ("gpu_busy_percent", None)
    printed = table(written)
    assert printed.splitlines()[2].startswith(
        f"| brats | {entry['bench_fast_off']['train_engine_s_per_step']:.4f} / "
    )
    assert "| gpu_busy_percent | brats | - | >= 90 | not measured |" in printed


def test_a_part_that_fails_is_recorded_and_the_rest_run() -> None:
    parts = _parts(_tiny_net(channels=2, dims=3))
    parts["val_inferer"] = SlidingWindowInferer(roi_size=(8, 8, 8))
    parts["loss"] = None  # every training part fails
    entry = prove_study("knee", TINY, parts, "softmax", Deadline(60), study_plan(0, 1, 0), log=lambda _: None)
    assert set(entry["errors"]) == {"bench_fast_off", "bench_fast_on", "burst"}
    assert entry["errors"]["burst"].startswith("TypeError")
    assert "amp_check" in entry and "volume" in entry


def test_parts_after_the_deadline_are_skipped() -> None:
    parts = _parts(_tiny_net(channels=2, dims=3))
    parts["val_inferer"] = SimpleInferer()
    entry = prove_study("lv", TINY, parts, "softmax", Deadline(0.0), study_plan(0, 1, 0), log=lambda _: None)
    assert set(entry["skipped"]) == set(PART_WEIGHTS) and not any(part in entry for part in PART_WEIGHTS)


def _entry(busy, efficiency, dice, volume_s, inferer="SlidingWindowInferer") -> dict:
    return {
        "inferer": inferer,
        "burst": {"gpu_busy_percent": busy},
        "inference": {"inference_efficiency": efficiency},
        "amp_check": {"amp_dice": dice} if dice is not None else None,
        "volume": {"volume_s": volume_s},
    }


def test_targets_are_judged_as_the_issue_sets_them() -> None:
    results = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "studies": {
            "brats": _entry(92.5, 0.65, 0.9995, 0.43),
            "lv": _entry(80.0, 1.0, None, 0.02, inferer="SimpleInferer"),
        },
    }
    judged = [(t["target"], t["study"], t["met"]) for t in evaluate_targets(results)]
    assert judged == [
        ("gpu_busy_percent", "brats", True),
        ("inference_efficiency", "brats", False),  # under 0.70
        ("amp_dice", "brats", True),
        ("volume_s", "brats", True),  # 0.43 < 0.5 on an H100
        ("gpu_busy_percent", "lv", False),
        ("amp_dice", "lv", None),  # not measured; and no window target for a whole-input inferer
    ]
    results["gpu"] = "NVIDIA A100-SXM4-80GB"
    volume = next(t for t in evaluate_targets(results) if t["target"] == "volume_s")
    assert volume["met"] is None and volume["value"] == 0.43 and "H100-class" in volume["note"]
    assert "| volume_s | brats | 0.43 | < 0.5 | not judged |" in table(results)
