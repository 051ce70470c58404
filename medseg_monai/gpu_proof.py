"""``make gpu-proof``: the GPU path of every bundle measured in one prepared call (issue #42).

A lent GPU machine comes with 15 minutes of device time, its start included, so this runs in one
command: about 8 minutes of parts after its imports (``--budget``), and a watchdog that writes what
was measured and stops the process at ``--hard-stop`` seconds whatever is running. For each bundle
(BraTS first: its figure is the headline), on a synthetic case of the bench's shapes
(``configs/bench.yaml``, the papers' inputs):

- the bench (``medseg_monai.bench``): the bundle's engine against a plain loop, AMP on, with the
  ``fast`` path off and on (cuDNN, transfers, the batch's place, as the bundles set them);
- a training burst through the engine with ``fast`` on, GPU busy sampled meanwhile (NVML);
- AMP inference against exact fp32 (TF32 off): Dice between the two segmentations;
- the bundle's ``val_inferer`` against a pure forward pass over the same windows;
- one paper-sized input end to end (host tensor in, label map back in host memory): seconds and
  peak GPU memory (BraTS: a 240 x 240 x 155 four-modality volume).

One JSON (``--output``) holds the device, the versions, every figure, each target and whether it
was met; a table is printed. The exit status is 0 when every target was measured and met, 1 when
one was missed or not measured, 3 after a hard stop, 2 for a refusal (no CUDA GPU). Docs:
``docs/gpu-proof.md``.

    python -m medseg_monai.gpu_proof [--studies brats lv] [--budget 450] [--hard-stop 540] [--output F]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from medseg_monai.bench import (
    _bundle_parts,
    _now,
    _peak_memory_mb,
    inference_throughput,
    settings,
    train_throughput,
)
from medseg_monai.config import at_repo_root, config_files, config_parser
from medseg_monai.record import cpu_description, device_description

__all__ = [
    "STUDIES",
    "BusySampler",
    "Deadline",
    "amp_agreement",
    "bundle_parts",
    "busy_summary",
    "cudnn_as_bundle",
    "evaluate_targets",
    "exact_fp32",
    "main",
    "phantom",
    "prove_study",
    "segment",
    "segmentation_dice",
    "steps_to_fill",
    "study_plan",
    "table",
    "training_burst",
    "volume_seconds",
    "write_results",
]

STUDIES = ("brats", "knee", "wmh", "lv", "xray")  # BraTS first: the headline before time can run out
BUDGET_S = 450.0  # the parts, after the imports: about 8 minutes in all
HARD_STOP_S = 540.0  # the watchdog: the device's command limit is 600 s, the wheels' install before it
RESERVE_S = 15.0  # kept back from the plan: the JSON, the table, a study's clean-up
# each study's share of its time, by part (the burst longest: NVML's figure needs seconds to settle)
PART_WEIGHTS = {
    "bench_fast_off": 0.2,
    "bench_fast_on": 0.2,
    "burst": 0.3,
    "amp_check": 0.05,
    "inference": 0.15,
    "volume": 0.1,
}
GPU_BUSY_TARGET = 90.0  # percent, the fast-on training burst of every bundle
WINDOW_TARGET = 0.70  # pure forward s / val_inferer s, for inferers that feed the network windows
AMP_DICE_TARGET = 0.999
BRATS_VOLUME_TARGET_S = 0.5  # with AMP, H100 class (MONAI's own BraTS bundle: 435 ms on an A100)
H100_CLASS = ("H100", "H200", "GH200")
# the engine the study's training handlers may watch (EarlyStopping attaches to the evaluator): one
# that never runs, so no validation data is built (the knee's would generate data and run N4)
IDLE_EVALUATOR = {"_target_": "ignite.engine.Engine", "process_function": "$lambda engine, batch: None"}


class Deadline:
    """Seconds since the start against the soft budget (checked between steps and parts)."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = budget_s
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def over(self) -> bool:
        return self.left() <= 0


def study_plan(left_s: float, studies_left: int, reserve_s: float = RESERVE_S) -> dict[str, float]:
    """Seconds for each part of the next study: what is left of the budget, less the reserve,
    shared equally by the studies still to run, then by :data:`PART_WEIGHTS`. Called at each
    study's start, so time a study leaves unused goes to those after it."""
    per_study = max(0.0, left_s - reserve_s) / max(1, studies_left)
    total = sum(PART_WEIGHTS.values())
    return {part: per_study * w / total for part, w in PART_WEIGHTS.items()}


def steps_to_fill(slice_s: float, per_step_s: float, lo: int, hi: int) -> int:
    """How many steps of ``per_step_s`` fit in ``slice_s``, at least ``lo`` (a figure needs them even
    when over its slice: the plan gives later studies less) and at most ``hi``."""
    if per_step_s <= 0:  # measured as free
        return hi
    return max(lo, min(hi, math.floor(slice_s / per_step_s)))


# ----------------------------------------------------------------------------- the synthetic case


def phantom(
    image_shape: list[int], label_shape: list[int], classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic case of these shapes (batch first), float32 on the host. One label channel:
    nested ellipsoids, class k (1..classes-1) inside radius 0.7 (classes-k)/(classes-1) of the
    half-extent (class classes-1 innermost); several (binary maps, e.g. the knee's bones): one
    ellipsoid of radius 0.25 per map, spread along the first spatial axis, not touching. Each sample's
    centres move by up to 0.1 per axis. The image: the class (or map number) times a contrast that
    grows with the channel, plus noise of 0.1, so every class is told apart by intensity."""
    gen = torch.Generator().manual_seed(seed)
    batch, channels, *spatial = image_shape
    maps = label_shape[1]
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, n) for n in spatial), indexing="ij"))
    view = (-1, *[1] * len(spatial))
    labels = torch.zeros(label_shape)
    images = torch.empty(image_shape)
    for b in range(batch):
        shift = (torch.rand(len(spatial), generator=gen) - 0.5) * 0.2
        intensity = torch.zeros(spatial)
        for m in range(maps):
            centre = shift.clone()
            if maps > 1:
                centre[0] += (m - (maps - 1) / 2) * 0.55
            radius = (grid - centre.view(view)).pow(2).sum(0).sqrt()
            if maps == 1:
                cls = sum((radius < 0.7 * (classes - k) / (classes - 1)).float() for k in range(1, classes))
                labels[b, 0] = cls
                intensity = cls / (classes - 1)
            else:
                inside = (radius < 0.25).float()
                labels[b, m] = inside
                intensity = intensity + inside * (m + 1) / maps
        for c in range(channels):
            images[b, c] = (1.0 + 0.5 * c) * intensity + 0.1 * torch.randn(spatial, generator=gen)
    return images, labels


# ----------------------------------------------------------------------------- the figures


def segment(
    net: torch.nn.Module, inferer: Any, volume: torch.Tensor, activation: str, amp: bool
) -> torch.Tensor:
    """The segmentation the bundle's postprocessing would make of ``inferer(volume, net)``: class
    indices (softmax studies; the first maximum, as ``medseg_monai.transforms.Argmaxd``) or one
    boolean map per channel (sigmoid studies: a logit above 0 is a probability above 0.5)."""
    with torch.no_grad(), torch.autocast(volume.device.type, enabled=amp):
        out = inferer(volume, net)
    if activation == "sigmoid":
        return out > 0
    return out.float().max(1).indices


def segmentation_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two segmentations' foreground, pooled over classes: class-index maps (0 background;
    a voxel agrees when both give it the same foreground class) or boolean maps (every channel a
    structure). 1.0 when both are empty."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"segmentations differ in shape or type: {tuple(a.shape)} {a.dtype}, {tuple(b.shape)} {b.dtype}"
        )
    if a.dtype == torch.bool:
        fa, fb, both = a, b, a & b
    else:
        fa, fb = a > 0, b > 0
        both = fa & (a == b)
    size = int(fa.sum()) + int(fb.sum())
    return 1.0 if size == 0 else 2 * int(both.sum()) / size


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Float32 convolutions and matrix products without TF32 (cuDNN's default allows it): the
    reference AMP is compared with."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def cudnn_as_bundle(fast: bool) -> Iterator[None]:
    """cuDNN as a bundle's run leaves it: MONAI's ``set_determinism`` (deterministic, no benchmark),
    then with ``fast`` ``medseg_monai.runtime.fast_path`` (benchmark, not deterministic)."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = fast, not fast
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def amp_agreement(parts: dict[str, Any], volume: torch.Tensor, activation: str) -> dict[str, Any]:
    """Segmentations of ``volume`` by the bundle's ``val_inferer`` with AMP and in exact fp32: their
    Dice, how many voxels differ, the reference's foreground share (near 0 or 1, the check says
    little) and the AMP call's seconds (the next parts size their repeats by it)."""
    net, inferer, device = parts["network"], parts["val_inferer"], volume.device
    net.eval()
    with exact_fp32():
        reference = segment(net, inferer, volume, activation, amp=False)
    start = _now(device)
    mixed = segment(net, inferer, volume, activation, amp=True)
    seconds = _now(device) - start
    return {
        "amp_dice": segmentation_dice(mixed, reference),
        "voxels_differing": int((mixed != reference).sum()),
        "foreground_fraction": float((reference != 0).float().mean()),
        "amp_call_s": seconds,
    }


def volume_seconds(
    parts: dict[str, Any], volume: torch.Tensor, activation: str, repeats: int, warmup: int = 1
) -> dict[str, Any]:
    """Seconds (median of ``repeats``) to segment ``volume`` end to end with AMP: from the loaded
    host tensor to the device, the bundle's ``val_inferer``, class indices (uint8) or boolean maps,
    back to host memory; and the peak GPU memory of those calls (the process's peak RSS on a CPU)."""
    net, inferer, device = parts["network"], parts["val_inferer"], parts["device"]
    net.eval()

    def once() -> torch.Tensor:
        seg = segment(net, inferer, volume.to(device), activation, amp=True)
        return (seg if seg.dtype == torch.bool else seg.to(torch.uint8)).cpu()  # a label map's bytes

    for _ in range(warmup):
        once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = _now(device)
        once()
        times.append(_now(device) - start)
    return {
        "volume_s": statistics.median(times),
        "volume_s_each": times,
        "input_shape": list(volume.shape),
        "peak_memory_mb": _peak_memory_mb(device),
    }


def busy_summary(samples: list[tuple[float, float]], settle_s: float) -> dict[str, Any]:
    """Mean, minimum and count of GPU-busy readings ``(seconds since the burst's start, percent)``
    taken after ``settle_s`` (NVML's figure covers its last 1/6 to 1 s, which began before the burst)."""
    kept = [v for t, v in samples if t >= settle_s]
    if len(kept) < 3:  # under three readings say nothing about a burst
        return {"gpu_busy_percent": None, "gpu_busy_min": None, "gpu_busy_readings": len(kept)}
    return {
        "gpu_busy_percent": statistics.fmean(kept),
        "gpu_busy_min": min(kept),
        "gpu_busy_readings": len(kept),
    }


class BusySampler:
    """Reads ``read`` (GPU busy, percent) every ``every`` seconds in a thread, between :meth:`start`
    and :meth:`stop` (which returns ``(seconds since start, percent)`` pairs)."""

    def __init__(self, read: Callable[[], float], every: float = 0.1) -> None:
        self.read = read
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = 0.0

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # a reading that fails once is a gap, not the end
                self.samples.append((time.monotonic() - self._t0, float(self.read())))

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return list(self.samples)


def busy_reader(device: torch.device) -> tuple[Callable[[], float] | None, str | None]:
    """A function reading the GPU's busy percent, and its source: ``torch.cuda.utilization`` (NVML
    through pynvml), else pynvml itself; (None, None) on a CPU or when neither answers."""
    if device.type != "cuda":
        return None, None
    with contextlib.suppress(Exception):
        torch.cuda.utilization(device)
        return (lambda: float(torch.cuda.utilization(device))), "torch.cuda.utilization"
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        pynvml.nvmlDeviceGetUtilizationRates(handle)
        return (lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)), "pynvml"
    return None, None


def training_burst(
    parts: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    deadline: Deadline,
    read_busy: Callable[[], float] | None,
    settle_s: float = 1.0,
    every: float = 0.1,
    max_s: float | None = None,
) -> dict[str, Any]:
    """``steps`` iterations of MONAI's ``SupervisedTrainer`` with the bundle's training handlers on
    the fast path (the batch on the device as its GPU cache holds it, non-blocking, zero_grad to
    None; cuDNN is the caller's), GPU busy read meanwhile from the third iteration on (the first two
    load and tune kernels). It stops early when the deadline passes or after ``max_s`` seconds (its
    steps are sized from the bench's step time, which may be wrong). The loss of the first and last
    iterations says whether the network learned the case (the AMP check runs on what it learned)."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.handlers import from_engine

    device = parts["device"]
    batch = {"image": images.to(device), "label": labels.to(device)}
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[batch] * steps,
        network=parts["network"],
        optimizer=parts["optimizer"],
        loss_function=parts["loss"],
        amp=parts["amp"],
        non_blocking=True,
        optim_set_to_none=True,
        train_handlers=[h for h in parts["train_handlers"] if h is not None],
    )
    sampler = BusySampler(read_busy, every) if read_busy is not None else None
    marks: dict[str, Any] = {}
    loss = from_engine(["loss"], first=True)

    def each(engine: Any) -> None:
        if engine.state.iteration == 1:
            marks["loss_first"] = float(loss(engine.state.output))
        if engine.state.iteration == 2:
            marks["start"] = _now(device)
            if sampler is not None:
                sampler.start()
        if deadline.over() or (max_s is not None and time.monotonic() - began > max_s):
            engine.terminate()

    parts["network"].train()
    trainer.add_event_handler(Events.ITERATION_COMPLETED, each)
    began = time.monotonic()
    trainer.run()
    end = _now(device)
    samples = sampler.stop() if sampler is not None else []
    done = trainer.state.iteration
    timed = max(done - 2, 0)
    seconds = end - marks["start"] if "start" in marks else 0.0
    return {
        "steps": done,
        "timed_steps": timed,
        "seconds": seconds,
        "s_per_step": seconds / timed if timed else None,
        "loss_first": marks.get("loss_first"),
        "loss_last": float(loss(trainer.state.output)),
        **busy_summary(samples, settle_s),
        "gpu_busy_samples": [round(v, 1) for _, v in samples],
    }


def probe_step_s(parts: dict[str, Any], images: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds of one plain training step (the second of two: the first loads the kernels), by
    which the bench's steps are sized."""
    net, loss_fn, opt, device, amp = (parts[k] for k in ("network", "loss", "optimizer", "device", "amp"))
    x, y = images.to(device), labels.to(device)
    net.train()
    took = 0.0
    for _ in range(2):
        start = _now(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.zero_grad(set_to_none=True)  # a probe, not training: the gradients are dropped
        took = _now(device) - start
    return took


# ----------------------------------------------------------------------------- one study


def bundle_parts(study: str, cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The bundle's parts as ``make bench`` builds them (its ``bench.yaml`` overrides: the paper's
    settings) with an evaluator that never runs, and its activation (``sigmoid`` or ``softmax``, from
    the first step of its ``val_postprocessing``)."""
    with at_repo_root():
        parts = _bundle_parts(study, cfg.get("overrides", {}), {"validate#evaluator": IDLE_EVALUATOR})
        first = config_parser(config_files(study), cfg.get("overrides", {})).get(
            "val_postprocessing#transforms#0"
        )
    return parts, "sigmoid" if first.get("sigmoid") else "softmax"


def prove_study(
    study: str,
    cfg: dict[str, Any],
    parts: dict[str, Any],
    activation: str,
    deadline: Deadline,
    slices: dict[str, float],
    read_busy: Callable[[], float] | None = None,
    log: Callable[[str], None] = print,
    entry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every part of one study in order, each sized to its slice of ``slices`` (seconds), skipped
    once the deadline has passed; a part that fails is recorded with its error and the rest go on.
    ``entry`` (filled in place, so a hard stop writes what is done) is returned."""
    entry = entry if entry is not None else {}
    device = parts["device"]
    train, inference = cfg["train"], cfg["inference"]
    entry.update(
        {
            "study": study,
            "unit": cfg.get("unit", "samples"),
            "overrides": cfg.get("overrides", {}),
            "train_batch_shape": list(train["image"]),
            "inference_input_shape": list(inference["image"]),
            "inferer": type(parts["val_inferer"]).__name__,
            "activation": activation,
            "parameters": sum(p.numel() for p in parts["network"].parameters()),
            "plan_s": {k: round(v, 1) for k, v in slices.items()},
            "skipped": {},
            "errors": {},
        }
    )
    torch.manual_seed(0)
    images, labels = phantom(train["image"], train["label"], train["classes"], seed=0)
    label_shape = [inference["image"][0], train["label"][1], *inference["image"][2:]]
    volume_host, _ = phantom(inference["image"], label_shape, train["classes"], seed=1)
    volume = volume_host.to(device)
    per = inference.get("per", 1)  # inputs in one inference call (X-ray: 4 images)
    state: dict[str, float] = {}

    def run(name: str, fn: Callable[[], dict[str, Any]], describe: Callable[[dict[str, Any]], str]) -> None:
        if deadline.over():
            entry["skipped"][name] = f"out of time (budget {deadline.budget_s:.0f} s)"
            log(f"[{deadline.elapsed():6.1f} s] {study} {name}: skipped, out of time")
            return
        entry["in_progress"] = name
        try:
            entry[name] = fn()
            log(f"[{deadline.elapsed():6.1f} s] {study} {name}: {describe(entry[name])}")
        except Exception as error:  # one part's failure (memory, a kernel) must not lose the others
            entry["errors"][name] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            log(f"[{deadline.elapsed():6.1f} s] {study} {name}: FAILED {entry['errors'][name]}")
            traceback.print_exc(limit=-2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            entry.pop("in_progress", None)

    def bench(fast: bool) -> dict[str, Any]:
        with cudnn_as_bundle(fast):
            if "step_s" not in state:
                state["step_s"] = probe_step_s(parts, images, labels)
            # a pair is an engine and a plain step, about twice a plain one; one pair warms up
            pairs = steps_to_fill(
                slices["bench_fast_on" if fast else "bench_fast_off"], 2 * state["step_s"], 3, 30
            )
            out = train_throughput(parts, images, labels, pairs - 1, 1, fast=fast)
        state["step_s"] = out["train_engine_s_per_step"]
        return {**out, "steps": pairs - 1, "cudnn_benchmark": fast}

    def burst() -> dict[str, Any]:
        # unsized when both benches failed: a few steps, enough to read whether the engine runs
        steps = 2 + (steps_to_fill(slices["burst"], state["step_s"], 5, 5000) if "step_s" in state else 10)
        with cudnn_as_bundle(True):
            return training_burst(
                parts, images, labels, steps, deadline, read_busy, max_s=2 * slices["burst"] + 2
            )

    def amp() -> dict[str, Any]:
        with cudnn_as_bundle(True):
            out = amp_agreement(parts, volume, activation)
        state["infer_s"] = out["amp_call_s"]
        return out

    def windows() -> dict[str, Any]:
        # unmeasured (the AMP check failed): the fewest calls
        calls = steps_to_fill(slices["inference"], 2 * state.get("infer_s", math.inf), 2, 20)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with cudnn_as_bundle(True):
            out = inference_throughput(parts, volume, 2 * calls, 1)
        return {**out, "calls": calls, "peak_memory_mb": _peak_memory_mb(device)}

    def whole() -> dict[str, Any]:
        repeats = steps_to_fill(slices["volume"], state.get("infer_s", math.inf), 3, 20)
        with cudnn_as_bundle(True):
            out = volume_seconds(parts, volume_host, activation, repeats)
        return {**out, "inputs_per_call": per, "s_per_input": out["volume_s"] / per}

    def steps(r: dict[str, Any]) -> str:
        return f"engine {r['train_engine_s_per_step']:.4f} s/step, plain {r['train_plain_s_per_step']:.4f}"

    run("bench_fast_off", lambda: bench(False), steps)
    run("bench_fast_on", lambda: bench(True), steps)
    run(
        "burst",
        burst,
        lambda r: (
            f"{r['timed_steps']} steps in {r['seconds']:.1f} s, "
            f"GPU busy {_fmt(r['gpu_busy_percent'], '.1f')} %, "
            f"loss {_fmt(r['loss_first'], '.3f')} -> {_fmt(r['loss_last'], '.3f')}"
        ),
    )
    run(
        "amp_check",
        amp,
        lambda r: (
            f"Dice {r['amp_dice']:.5f} ({r['voxels_differing']} voxels differ, "
            f"foreground {r['foreground_fraction']:.3f})"
        ),
    )
    run(
        "inference",
        windows,
        lambda r: (
            f"{r['inference_windows']} windows, inferer {r['inference_s_per_call']:.4f} s, "
            f"forward {r['forward_s_per_call']:.4f} s, efficiency {r['inference_efficiency']:.2f}"
        ),
    )
    run(
        "volume",
        whole,
        lambda r: f"{r['volume_s']:.4f} s a call end to end, peak {r['peak_memory_mb']:.0f} MB",
    )
    return entry


# ----------------------------------------------------------------------------- targets, JSON, table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _figure(entry: dict[str, Any], part: str, key: str) -> Any:
    return (entry.get(part) or {}).get(key)


def is_h100_class(gpu: str | None) -> bool:
    """Whether ``gpu`` (its name) is an H100-class card, for which the BraTS target is set."""
    return gpu is not None and any(name in gpu for name in H100_CLASS)


def _target(
    name: str,
    study: str,
    value: float | None,
    op: str,
    threshold: float,
    applies: bool = True,
    note: str = "",
) -> dict[str, Any]:
    met = None
    if value is not None and applies:
        met = value >= threshold if op == ">=" else value < threshold
    return {
        "target": name,
        "study": study,
        "value": value,
        "op": op,
        "threshold": threshold,
        "met": met,
        "note": note,
    }


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #42 with its figure and ``met`` (None: not measured, or not for this
    card): GPU busy in every fast-on burst; the inferer against a pure forward where it feeds the
    network windows (not ``SimpleInferer``; known once the study is set up); AMP against fp32; the
    BraTS volume on an H100-class card."""
    rows = []
    for study, e in results["studies"].items():
        busy, dice = _figure(e, "burst", "gpu_busy_percent"), _figure(e, "amp_check", "amp_dice")
        rows.append(_target("gpu_busy_percent", study, busy, ">=", GPU_BUSY_TARGET))
        if e.get("inferer") not in (None, "SimpleInferer"):  # None: the study was not set up
            efficiency = _figure(e, "inference", "inference_efficiency")
            rows.append(_target("inference_efficiency", study, efficiency, ">=", WINDOW_TARGET))
        rows.append(_target("amp_dice", study, dice, ">=", AMP_DICE_TARGET))
        if study == "brats":
            h100 = is_h100_class(results.get("gpu"))
            note = "" if h100 else "set for an H100-class card: figure recorded, not judged"
            seconds = _figure(e, "volume", "volume_s")
            rows.append(_target("volume_s", study, seconds, "<", BRATS_VOLUME_TARGET_S, h100, note))
    return rows


def table(results: dict[str, Any]) -> str:
    """One row per study, then one per target."""
    rows = [
        "| study | engine / plain s/step, fast off | fast on | GPU busy % | inferer / forward | s/input "
        "| peak MB | AMP Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for study, e in results["studies"].items():

        def pair(part: str, e: dict[str, Any] = e) -> str:
            engine, plain = (
                _figure(e, part, "train_engine_s_per_step"),
                _figure(e, part, "train_plain_s_per_step"),
            )
            return f"{_fmt(engine, '.4f')} / {_fmt(plain, '.4f')}"

        rows.append(
            f"| {study} | {pair('bench_fast_off')} | {pair('bench_fast_on')} "
            f"| {_fmt(_figure(e, 'burst', 'gpu_busy_percent'), '.1f')} "
            f"| {_fmt(_figure(e, 'inference', 'inference_efficiency'), '.2f')} "
            f"| {_fmt(_figure(e, 'volume', 's_per_input'), '.4f')} "
            f"| {_fmt(_figure(e, 'volume', 'peak_memory_mb'), '.0f')} "
            f"| {_fmt(_figure(e, 'amp_check', 'amp_dice'), '.5f')} |"
        )
    rows += ["", "| target | study | figure | wanted | met |", "|---|---|---|---|---|"]
    for t in results.get("targets") or evaluate_targets(results):
        met = {True: "yes", False: "MISSED", None: "not measured" if t["value"] is None else "not judged"}[
            t["met"]
        ]
        rows.append(
            f"| {t['target']} | {t['study']} | {_fmt(t['value'], '.4g')} "
            f"| {t['op']} {t['threshold']:g} | {met} |"
        )
    return "\n".join(rows)


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    """Judge the targets into ``results`` and write it as JSON (through a temporary file, so a hard
    stop never leaves half a file)."""
    results["targets"] = evaluate_targets(results)
    results["all_met"] = all(t["met"] is True for t in results["targets"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


def _header(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """What the figures were measured on and with: the JSON's first keys."""
    import monai

    return {
        "device": device_description(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_mb": torch.cuda.get_device_properties(device).total_memory / 2**20
        if device.type == "cuda"
        else None,
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "monai": monai.__version__,
        "budget_s": args.budget,
        "hard_stop_s": args.hard_stop,
        "studies": {},
    }


def main(argv: list[str] | None = None) -> int:
    """The command: refuse without a CUDA GPU, else every study in turn under the budget and the
    watchdog, then the JSON, the table and the exit status (the module's docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m medseg_monai.gpu_proof", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds for the parts (default %(default)s)"
    )
    parser.add_argument(
        "--hard-stop", type=float, default=HARD_STOP_S, help="seconds; the watchdog (default %(default)s)"
    )
    parser.add_argument("--output", default="runs/gpu_proof.json")
    args = parser.parse_args(argv)
    if not 0 < args.budget < args.hard_stop:
        parser.error(f"want 0 < --budget < --hard-stop, got {args.budget:g} and {args.hard_stop:g}")
    if not torch.cuda.is_available():
        print(
            f"error: the GPU proof needs a CUDA GPU and torch {torch.__version__} sees none; run it on a "
            "device machine (docs/gpu-proof.md)",
            file=sys.stderr,
        )
        return 2
    deadline = Deadline(args.budget)
    device = torch.device("cuda", torch.cuda.current_device())
    results = _header(device, args)
    read_busy, source = busy_reader(device)
    results["busy_source"] = source
    lock = threading.Lock()  # the watchdog and the main thread never write the file at once

    def finish(stopped: str | None) -> dict[str, Any]:
        """Write the JSON and print the table; returns what was written."""
        results["stopped"] = stopped
        results["wall_s"] = deadline.elapsed()
        with lock:
            for attempt in range(3):  # the main thread may change the dict while the watchdog copies it
                try:
                    snapshot = json.loads(json.dumps(results, default=str))
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
            write_results(args.output, snapshot)
        print(table(snapshot), flush=True)
        return snapshot

    def hard_stop() -> None:
        doing = ", ".join(
            f"{s} {e['in_progress']}" for s, e in results["studies"].items() if "in_progress" in e
        )
        reason = f"hard stop at {args.hard_stop:g} s during {doing or 'setup'}"
        try:
            print(f"gpu-proof: {reason}", flush=True)
            finish(reason)
            print(f"wrote {args.output}", flush=True)
        finally:  # whatever the writing did, the process ends now
            os._exit(3)

    watchdog = threading.Timer(args.hard_stop - deadline.elapsed(), hard_stop)
    watchdog.daemon = True
    watchdog.start()
    print(
        f"gpu-proof on {results['device']}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"budget {args.budget:g} s, hard stop {args.hard_stop:g} s, GPU busy from {source}",
        flush=True,
    )
    for study in args.studies:  # a hard stop lists the studies it did not reach
        results["studies"][study] = {"skipped": {"all": "not reached"}}
    for i, study in enumerate(args.studies):
        entry: dict[str, Any] = results["studies"][study]
        entry.clear()
        if deadline.over():
            entry["skipped"] = {"all": f"out of time (budget {args.budget:g} s)"}
            continue
        slices = study_plan(deadline.left(), len(args.studies) - i)
        cfg = settings(study)
        parts: dict[str, Any] | None = None
        try:
            parts, activation = bundle_parts(study, cfg)
            prove_study(study, cfg, parts, activation, deadline, slices, read_busy, entry=entry)
        except Exception as error:  # a bundle that does not build (or its case) is a finding, not the end
            entry.setdefault("errors", {})["setup"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            traceback.print_exc(limit=-2)
        parts = None  # the next study's memory figures are its own
        gc.collect()
        torch.cuda.empty_cache()
    watchdog.cancel()
    targets = finish(None)["targets"]
    met = sum(t["met"] is True for t in targets)
    missed = sum(t["met"] is False for t in targets)
    print(
        f"gpu-proof: {met} of {len(targets)} targets met, {missed} missed, "
        f"{len(targets) - met - missed} not measured or not judged; {deadline.elapsed():.0f} s; "
        f"wrote {args.output}"
    )
    return 0 if met == len(targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
