"""make bench: every bundle measured with one JSON schema, on tensors small enough for a test."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import torch

from medseg_monai.bench import bench_study, main, table, train_throughput, validate
from medseg_monai.record import cpu_description

# each bundle's bench.yaml at test size: the same keys, smaller tensors (and the settings they need)
TINY = {
    "xray": {
        "overrides": {"dataset": "xray-synthetic", "image_size": 64, "batch_size": 2},
        "unit": "images",
        "train": {"image": [2, 1, 64, 64], "label": [2, 1, 64, 64], "classes": 3},
        "inference": {"image": [2, 1, 64, 64], "per": 2},
    },
    "wmh": {
        "overrides": {"dataset": "wmh-synthetic", "in_plane_size": 64, "batch_size": 2},
        "unit": "slices",
        "train": {"image": [2, 3, 64, 64], "label": [2, 1, 64, 64], "classes": 2},
        "inference": {"image": [1, 1, 64, 64, 4], "per": 1},
    },
    "brats": {
        "overrides": {"dataset": "brats-synthetic", "crop_size": [32, 32, 32], "batch_size": 1},
        "unit": "volumes",
        "train": {"image": [1, 4, 32, 32, 32], "label": [1, 1, 32, 32, 32], "classes": 4},
        "inference": {"image": [1, 4, 48, 40, 32], "per": 1},
    },
    "knee": {
        "overrides": {"dataset": "knee-synthetic", "size": [64, 64, 16], "batch_size": 1},
        "unit": "volumes",
        "train": {"image": [1, 1, 64, 64, 16], "label": [1, 3, 64, 64, 16], "classes": 2},
        "inference": {"image": [1, 1, 96, 64, 16], "per": 1},
    },
    "lv": {
        "overrides": {"dataset": "lv-synthetic", "block_size": [32, 32, 8], "batch_size": 1},
        "unit": "blocks",
        "train": {"image": [2, 1, 32, 32, 8], "label": [2, 1, 32, 32, 8], "classes": 3},
        "inference": {"image": [1, 1, 64, 64, 8], "per": 1},
        "variants": {"full_conv": {"conv": "full"}},
    },
}


def _results(entries: dict) -> dict:
    return {
        "device": "cpu",
        "cpu": cpu_description(),
        "python": "3",
        "torch": torch.__version__,
        "threads": 1,
        "steps": 1,
        "studies": entries,
    }


@pytest.mark.parametrize(
    "study", ["xray", *(pytest.param(s, marks=pytest.mark.slow) for s in ("wmh", "brats", "knee", "lv"))]
)
def test_bench_entry_follows_the_schema(study: str) -> None:
    entry = bench_study(study, steps=1, warmup=1, cfg=TINY[study])
    validate(_results({study: entry}))
    assert entry["study"] == study and entry["unit"] == TINY[study]["unit"]
    assert entry["train_samples_per_s"] == pytest.approx(
        TINY[study]["train"]["image"][0] / entry["train_engine_s_per_step"]
    )
    ratio = entry["train_engine_s_per_step"] / entry["train_plain_s_per_step"]
    assert entry["engine_overhead_ratio"] == pytest.approx(ratio)
    # the 3D studies infer by sliding window: several windows for an input larger than one
    assert (entry["inference_windows"] > 1) == (study in ("brats", "knee"))
    assert entry["inference_efficiency"] == pytest.approx(
        entry["forward_s_per_input"] / entry["inference_s_per_input"]
    )
    if study == "lv":  # the factorised network has more parameters than one 3x3x3 conv per block
        assert entry["variants"]["full_conv"]["parameters"] < entry["parameters"]
    row = table(_results({study: entry})).splitlines()[-1]
    assert row.startswith(f"| {study} | {TINY[study]['train']['image'][0]} ({entry['unit']})")


class _SlowingNet(torch.nn.Module):
    """A 1x1 convolution whose every call sleeps longer than the last: a host slowing down."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(0.01 * self.calls)
        return self.conv(x)


def test_engine_and_plain_steps_alternate_so_drift_falls_on_both() -> None:
    """Timed one block after the other, a host slowing down (and a per-epoch handler spread over the
    steps) made the engine look 3.9 times as slow as the plain loop on the same work; alternating,
    the two see the same drift. The engine's once-per-epoch handlers are reported apart."""
    from ignite.engine import Events

    net = _SlowingNet()

    class EpochWork:  # a handler that costs 0.3 s once an epoch, as a checkpoint save might
        def attach(self, engine) -> None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: time.sleep(0.3))

    parts = {
        "network": net,
        "loss": torch.nn.functional.mse_loss,
        "optimizer": torch.optim.SGD(net.parameters(), lr=0.01),
        "device": torch.device("cpu"),
        "amp": False,
        "train_handlers": [EpochWork()],
    }
    x = torch.randn(1, 1, 4, 4)
    timed = train_throughput(parts, x, x, steps=5, warmup=1)
    assert net.calls == 12  # (1 warm-up + 5) engine and plain steps each
    assert 0.7 < timed["engine_overhead_ratio"] < 1.2
    assert timed["train_engine_s_per_step"] < 0.2 and timed["train_engine_s_per_epoch"] >= 0.3


@pytest.mark.parametrize("args", [["--steps", "0"], ["--warmup", "-1"]])
def test_bench_refuses_no_timed_steps_in_one_line(args, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--studies", "xray", *args])
    assert exit_.value.code == 2
    assert "error: --steps must be >= 1 and --warmup >= 0" in capsys.readouterr().err


def test_schema_refuses_a_missing_figure() -> None:
    entry = bench_study("xray", steps=1, warmup=0, cfg=TINY["xray"])
    del entry["inference_efficiency"]
    with pytest.raises(jsonschema.ValidationError, match="inference_efficiency"):
        validate(_results({"xray": entry}))


@pytest.mark.slow
def test_make_bench_writes_json_and_table(tmp_path, monkeypatch, capsys) -> None:
    """The command: one process per study, bench.json valid, the table of docs/performance.md printed."""
    import medseg_monai.bench as bench

    monkeypatch.setattr(bench, "settings", lambda study: TINY[study])
    out = tmp_path / "bench.json"
    assert main(["--studies", "xray", "lv", "--steps", "1", "--warmup", "0", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    validate(results)
    assert list(results["studies"]) == ["xray", "lv"]
    printed = capsys.readouterr().out
    assert "| study | batch (unit) |" in printed and "| lv | 2 (blocks)" in printed
    # CPU timings compare only between alike hosts: the processor and its vector ISA are recorded
    capability = torch.backends.cpu.get_cpu_capability()
    assert results["cpu"].endswith(f" cores, {capability}") and f"({results['cpu']})" in printed


def test_agreement_dice_by_hand() -> None:
    """Foreground classes only, a class in neither map skipped: class 1 (2 and 1 pixels, 1 shared)
    2/3, class 2 (1 and 1, shared) 1, class 3 absent: mean 5/6."""
    from medseg_monai.bench import agreement_dice

    pred = torch.tensor([[0, 1, 1, 2]])
    ref = torch.tensor([[0, 1, 0, 2]])
    assert agreement_dice(pred, ref) == pytest.approx((2 / 3 + 1) / 2)
    assert agreement_dice(torch.zeros(4), torch.zeros(4)) == 1.0


def test_engine_networks_give_eagers_output() -> None:
    """bf16 autocast within bfloat16's precision, ONNX Runtime (exported on first call, then any
    batch and size) within the export tolerance; an unknown engine is refused in one line."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed: pip install -e .[deploy]")
    from medseg_monai.errors import InputError
    from medseg_monai.export import ATOL, RTOL, EngineNetwork
    from medseg_monai.networks import ClassicUNet

    torch.manual_seed(0)
    net = ClassicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 8, 16, 32, 64)).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        eager = net(x)
        torch.testing.assert_close(EngineNetwork(net, "bf16")(x), eager, rtol=0.05, atol=0.05)
        onnx = EngineNetwork(net, "onnxruntime")
        torch.testing.assert_close(onnx(x), eager, rtol=RTOL, atol=ATOL)
        other = torch.rand(2, 1, 48, 64)
        torch.testing.assert_close(onnx(other), net(other), rtol=RTOL, atol=ATOL)
    with pytest.raises(InputError, match="^engine 'tensorrt' is not one of torch, bf16, onnxruntime$"):
        EngineNetwork(net, "tensorrt")


@pytest.mark.slow
def test_engine_comparison_on_a_real_radiograph(shared_data, tmp_path) -> None:
    """make bench's engines part: each engine timed on a real JSRT image through the X-ray bundle's
    inference, with its Dice against eager; bench.json valid, the table printed."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed: pip install -e .[deploy]")
    out = tmp_path / "bench.json"
    argv = ["--studies", "xray", "--parts", "engines", "--steps", "1", "--warmup", "0", "--output", str(out)]
    assert main([*argv, "--data", str(shared_data)]) == 0
    results = json.loads(out.read_text())
    validate(results)
    entry = results["cpu_engines"]["xray"]
    assert entry["dataset"] == "jsrt-scr" and set(entry["engines"]) == {"torch", "bf16", "onnxruntime"}
    assert entry["engines"]["torch"]["dice_vs_eager"] == 1.0 and entry["engines"]["torch"]["speedup"] == 1.0
    assert entry["engines"]["onnxruntime"]["dice_vs_eager"] > 0.998
    assert entry["fastest_keeping_result"] in entry["engines"]


@pytest.mark.slow
def test_engine_comparison_on_the_synthetic_knee_writes_nothing_where_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The knee study has no public data: its engines run on the synthetic set from the cache, not
    from a data root 'None' generated in the working directory (what str(None) did)."""
    from medseg_monai.bench import engine_comparison
    from medseg_monai.paths import project_root

    monkeypatch.chdir(project_root())  # where the bundles' config paths start
    assert not (project_root() / "None").exists()
    entry = engine_comparison("knee", None, steps=1, warmup=0)
    assert entry["dataset"] == "knee-synthetic" and entry["engines"]["torch"]["dice_vs_eager"] == 1.0
    assert not (project_root() / "None").exists()
