"""``make bench``: throughput of each bundle's training step and inference, against a plain
PyTorch loop over the same network, loss, optimiser and pre-loaded tensors.

Each bundle says what to measure in ``configs/bench.yaml`` (overrides for its train.yaml, the shapes
of one training batch and one inference input, optional ``variants``: named overrides whose
training step is timed too); this module builds the bundle through the launcher
and times it in a process of its own (so that peak memory is the study's). The engine's overhead
(MONAI ``SupervisedTrainer`` with the bundle's own training handlers, Ignite events, batch
preparation) is the ratio ``engine_s / plain_s`` per step, the two steps alternating (medians), with
its once-per-epoch seconds apart; the inferer's efficiency is a pure forward pass over the same
windows divided by the ``val_inferer`` call, the two also alternating. Results go to JSON
(``--output``, default ``bench.json``, schema ``medseg_monai/schemas/bench.schema.json``) with the
device and versions, and a Markdown table is printed (docs/performance.md's).

    python -m medseg_monai.bench [--studies wmh xray] [--steps 5] [--warmup 2] [--output bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from medseg_monai.config import config_files, config_parser, studies
from medseg_monai.export import ENGINES, EngineNetwork, network_input
from medseg_monai.handlers import GradientClipping
from medseg_monai.paths import project_root
from medseg_monai.record import cpu_description, device_description

__all__ = [
    "agreement_dice",
    "bench_study",
    "engine_comparison",
    "engine_table",
    "inference_throughput",
    "main",
    "table",
    "time_alternating",
    "train_throughput",
    "validate",
]


def _now(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_alternating(
    first: Callable[[], Any], second: Callable[[], Any], steps: int, warmup: int, device: torch.device
) -> tuple[float, float]:
    """Median seconds of a call of ``first`` and of ``second``, called in turn ``steps`` times each
    after ``warmup`` calls each, so that a shared host's drift in speed falls on both alike."""
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, out in zip((first, second), times, strict=True):
            start = _now(device)
            fn()
            out.append(_now(device) - start)
    return statistics.median(times[0]), statistics.median(times[1])


def settings(study: str) -> dict[str, Any]:
    """The bundle's ``configs/bench.yaml``."""
    return yaml.safe_load((project_root() / "bundles" / study / "configs" / "bench.yaml").read_text())


def _bundle_parts(
    study: str, overrides: dict[str, Any], replace: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The bundle's own network, loss, optimiser, training handlers, inferer, device and AMP flag.
    ``replace`` sets ids after the shared sections are copied in (``validate#evaluator``, which an
    override cannot reach: ``make gpu-proof`` puts an engine that never runs there)."""
    parser = config_parser(config_files(study), overrides)
    for key, value in (replace or {}).items():
        parser[key] = value
    keys = ("network", "loss", "optimizer", "train_handlers", "val_inferer", "device", "amp")
    return {k: parser.get_parsed_content(k) for k in keys}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_throughput(
    parts: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    warmup: int,
    fast: bool | None = None,
) -> dict[str, float]:
    """Seconds per step (median of ``steps``, after ``warmup``) of a plain PyTorch loop and of MONAI's
    ``SupervisedTrainer`` with the bundle's training handlers, over the same network, loss, optimiser
    and pre-loaded batch, the two steps alternating; and the engine's once-per-epoch seconds (its
    start, epoch and completion events and handlers). The plain loop clips gradients as the
    bundle's ``GradientClipping`` handler does, when it has one.

    ``fast`` None (``make bench``): the batch is on the device, the trainer's defaults. ``fast``
    True or False: the trainer as the bundles' ``fast`` key sets it (non-blocking transfers, zero_grad
    to None); off, the batch stays in host memory and both loops copy it every step, as a
    host-memory cache hands it over; on, it is on the device, as the fast path's GPU cache holds it.
    cuDNN's settings are the caller's (``medseg_monai.gpu_proof.cudnn_as_bundle``)."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    net, loss_fn, opt, device, amp = (parts[k] for k in ("network", "loss", "optimizer", "device", "amp"))
    handlers = [h for h in parts["train_handlers"] if h is not None]
    clip = next((h.max_norm for h in handlers if isinstance(h, GradientClipping)), None)
    if fast is not False:
        images, labels = images.to(device), labels.to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        x, y = images.to(device, non_blocking=bool(fast)), labels.to(device, non_blocking=bool(fast))
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(opt)
        scaler.update()

    def make_trainer(n: int) -> SupervisedTrainer:
        return SupervisedTrainer(
            device=device,
            max_epochs=1,
            train_data_loader=[{"image": images, "label": labels}] * n,
            network=net,
            optimizer=opt,
            loss_function=loss_fn,
            amp=amp,
            non_blocking=bool(fast),
            optim_set_to_none=bool(fast),
            train_handlers=handlers,
        )

    net.train()
    # One engine iteration, then one plain step, in turn, so a shared host's drift in speed falls on
    # both alike (timed one block after the other, the ratio moved by +-10 % between runs); the
    # first ``warmup`` pairs are not counted. An engine iteration is everything between two plain
    # steps: loader, batch preparation, events and the bundle's per-iteration handlers. Its
    # once-per-epoch work is timed apart.
    engine_s: list[float] = []
    plain_s: list[float] = []
    mark = [0.0]
    trainer = make_trainer(warmup + steps)

    def start_epoch(_: Any) -> None:
        mark[0] = _now(device)

    def alternate(_: Any) -> None:
        engine_s.append(_now(device) - mark[0])
        start = _now(device)
        plain_step()
        mark[0] = _now(device)
        plain_s.append(mark[0] - start)

    trainer.add_event_handler(Events.EPOCH_STARTED, start_epoch)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, alternate)  # after the bundle's handlers
    start = _now(device)
    trainer.run()
    per_epoch = _now(device) - start - sum(engine_s) - sum(plain_s)
    engine, plain = statistics.median(engine_s[warmup:]), statistics.median(plain_s[warmup:])
    return {
        "train_plain_s_per_step": plain,
        "train_engine_s_per_step": engine,
        "engine_overhead_ratio": engine / plain,
        "train_engine_s_per_epoch": max(per_epoch, 0.0),
    }


class _CallShapes(torch.nn.Module):
    """The network, recording the input shape of every call (the windows an inferer feeds it)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> Any:
        self.shapes.append(tuple(x.shape))
        return self.net(x)


def inference_throughput(
    parts: dict[str, Any], volume: torch.Tensor, steps: int, warmup: int
) -> dict[str, float]:
    """Seconds per call (medians, the two alternating) of the bundle's ``val_inferer`` on ``volume``
    (sliding window for the 3D studies), and of a pure forward pass over the same windows (the input
    shapes the inferer gave the network, as pre-allocated tensors): their ratio is the inferer's
    efficiency, 1 when stitching, padding and blending cost nothing."""
    net, device, amp, inferer = parts["network"], parts["device"], parts["amp"], parts["val_inferer"]
    net.eval()
    counted = _CallShapes(net)
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        inferer(volume, counted)
    windows = [torch.randn(shape, device=device) for shape in counted.shapes]

    def infer() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            inferer(volume, net)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            for window in windows:
                net(window)

    calls = max(1, steps // 2)
    inference, pure = time_alternating(infer, forward, calls, warmup, device)
    return {
        "inference_s_per_call": inference,
        "forward_s_per_call": pure,
        "inference_windows": len(windows),
        "inference_efficiency": pure / inference,
    }


def bench_study(
    study: str, steps: int = 5, warmup: int = 2, cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One study's entry of ``bench.json`` (schema: ``medseg_monai/schemas/bench.schema.json``), from
    its ``bench.yaml`` (or ``cfg``): training samples/s through the bundle vs a plain loop, inference
    through the bundle's ``val_inferer`` vs a pure forward pass over the same windows, peak memory
    of this process (run each study in its own, as :func:`main` does, for a per-study figure)."""
    cfg = cfg if cfg is not None else settings(study)
    overrides = cfg.get("overrides", {})
    parts = _bundle_parts(study, overrides)
    device = parts["device"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(0)
    train = cfg["train"]
    images = torch.randn(train["image"], generator=gen)
    labels = torch.randint(0, train["classes"], train["label"], generator=gen).float()
    timed = train_throughput(parts, images, labels, steps, warmup)
    volume = torch.randn(cfg["inference"]["image"], generator=gen).to(device)
    inference = inference_throughput(parts, volume, steps, warmup)
    batch, per = train["image"][0], cfg["inference"].get("per", 1)
    variants = {}  # the same step with other settings, e.g. the LV study's full 3x3x3 convolutions
    for name, extra in (cfg.get("variants") or {}).items():
        other = _bundle_parts(study, {**overrides, **extra})
        step = train_throughput(other, images, labels, steps, warmup)
        variants[name] = {
            "overrides": extra,
            "parameters": sum(p.numel() for p in other["network"].parameters()),
            "train_plain_s_per_step": step["train_plain_s_per_step"],
            "train_engine_s_per_step": step["train_engine_s_per_step"],
        }
    return {
        "study": study,
        "unit": cfg.get("unit", "samples"),
        "overrides": overrides,
        "device": str(device),
        "amp": bool(parts["amp"]),
        "parameters": sum(p.numel() for p in parts["network"].parameters()),
        "train_batch_shape": list(train["image"]),
        **timed,
        "train_samples_per_s": batch / timed["train_engine_s_per_step"],
        "train_plain_samples_per_s": batch / timed["train_plain_s_per_step"],
        "inference_input_shape": list(cfg["inference"]["image"]),
        "inference_inputs_per_call": per,
        "inference_s_per_input": inference["inference_s_per_call"] / per,
        "forward_s_per_input": inference["forward_s_per_call"] / per,
        "inference_windows": inference["inference_windows"],
        "inference_efficiency": inference["inference_efficiency"],
        "peak_memory_mb": _peak_memory_mb(device),
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "variants": variants,
    }


# a real sample per study for the CPU engines (the knee study's data is not public: its synthetic set)
ENGINE_SAMPLES = {
    "brats": "brats2018",
    "knee": "knee-synthetic",
    "lv": "acdc",
    "wmh": "wmh-clinical-flair",
    "xray": "jsrt-scr",
}
ENGINE_DICE_TOLERANCE = 0.002  # an engine keeps the result when its Dice against eager is >= 1 - this


def _classes(logits: torch.Tensor) -> torch.Tensor:
    """Class indices of a prediction: argmax, or logit > 0 for one sigmoid channel."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def agreement_dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean Dice over the foreground classes of two class maps (a class in neither is skipped; 1.0
    when neither has foreground)."""
    scores = []
    for c in range(1, int(max(pred.max(), ref.max())) + 1):
        a, b = pred == c, ref == c
        total = int(a.sum() + b.sum())
        if total:
            scores.append(2 * int((a & b).sum()) / total)
    return sum(scores) / len(scores) if scores else 1.0


def engine_comparison(
    study: str, data_root: str | Path | None, steps: int = 3, warmup: int = 1, ckpt: str | Path | None = None
) -> dict[str, Any]:
    """Seconds per input of the bundle's inference (quick profile's network, its ``val_inferer``, the
    first validation case of the study's real sample after the bundle's preprocessing) through each
    CPU engine of :class:`medseg_monai.export.EngineNetwork`, the engines called in turn (medians),
    and each one's Dice against eager's classes. ``ckpt``: trained weights (else seeded, untrained)."""
    dataset = ENGINE_SAMPLES[study]
    parser = config_parser(
        config_files(study, profile="quick"),
        # no data_root for a synthetic sample: the cache's (str(None) made a folder 'None' here)
        {"dataset": dataset, "data_root": None if data_root is None else str(data_root), "seed": 0},
    )
    net = parser.get_parsed_content("network").eval()
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        getattr(net, "module", net).load_state_dict(state.get("model", state))
    case = (parser.get_parsed_content("val_datalist") or parser.get_parsed_content("train_datalist"))[0]
    image, _ = network_input(parser, case)
    inferer = parser.get_parsed_content("val_inferer")
    available = [e for e in ENGINES if e != "onnxruntime" or _has_onnxruntime()]
    engines = {name: EngineNetwork(net, name) for name in available}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    preds: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(warmup + steps):  # in turn, so a shared host's drift falls on all alike
            for name, engine in engines.items():
                start = time.perf_counter()
                out = inferer(image, engine)
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - start)
                preds[name] = _classes(torch.as_tensor(out).float())
    eager = statistics.median(seconds["torch"])
    results = {
        name: {
            "s_per_input": statistics.median(seconds[name]),
            "speedup": eager / statistics.median(seconds[name]),
            "dice_vs_eager": agreement_dice(preds[name], preds["torch"]),
        }
        for name in engines
    }
    kept = [n for n, r in results.items() if r["dice_vs_eager"] >= 1 - ENGINE_DICE_TOLERANCE]
    return {
        "dataset": dataset,
        "case": str(case.get("case_id", "?")),
        "input_shape": list(image.shape),
        "weights": str(ckpt) if ckpt is not None else "untrained (seed 0)",
        "threads": torch.get_num_threads(),
        "engines": results,
        "fastest_keeping_result": min(kept, key=lambda n: results[n]["s_per_input"]),
    }


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _engines_in_process(
    study: str, data_root: str | None, steps: int, warmup: int, ckpt: str | None
) -> dict[str, Any]:
    torch.manual_seed(0)
    return engine_comparison(study, data_root, steps=steps, warmup=warmup, ckpt=ckpt)


def engine_table(engines: dict[str, Any]) -> str:
    """docs/performance.md's table of ``bench.json``'s ``cpu_engines``."""
    names = ("torch", "bf16", "onnxruntime")
    rows = [
        "| study | sample | torch s/input | bf16 s/input (x, Dice) | onnxruntime s/input (x, Dice) | fastest keeping Dice |",
        "|---|---|---|---|---|---|",
    ]
    for study, r in engines.items():
        e = r["engines"]
        cells = [f"{e['torch']['s_per_input']:.3f}"] + [
            f"{e[n]['s_per_input']:.3f} ({e[n]['speedup']:.2f}x, {e[n]['dice_vs_eager']:.4f})"
            if n in e
            else "-"
            for n in names[1:]
        ]
        rows.append(
            f"| {study} | {r['dataset']} {r['case']} | {' | '.join(cells)} | {r['fastest_keeping_result']} |"
        )
    return "\n".join(rows)


def _bench_in_process(study: str, steps: int, warmup: int, cfg: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    return bench_study(study, steps=steps, warmup=warmup, cfg=cfg)


def validate(results: dict[str, Any]) -> None:
    """Check ``results`` against ``medseg_monai/schemas/bench.schema.json`` (raises on a mismatch)."""
    import jsonschema

    schema = json.loads((Path(__file__).parent / "schemas" / "bench.schema.json").read_text())
    jsonschema.validate(results, schema)


def table(results: dict[str, Any]) -> str:
    """docs/performance.md's table of ``bench.json``: one row per study."""
    rows = [
        "| study | batch (unit) | engine s/step | plain s/step | engine / plain | inference s/input "
        "| forward s/input | efficiency | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for study, r in results["studies"].items():
        rows.append(
            f"| {study} | {r['train_batch_shape'][0]} ({r['unit']}) | {r['train_engine_s_per_step']:.3f} "
            f"| {r['train_plain_s_per_step']:.3f} | {r['engine_overhead_ratio']:.3f} "
            f"| {r['inference_s_per_input']:.3f} | {r['forward_s_per_input']:.3f} "
            f"| {r['inference_efficiency']:.2f} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    benched = [s for s in studies() if (project_root() / "bundles" / s / "configs" / "bench.yaml").is_file()]
    parser = argparse.ArgumentParser(prog="medseg-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", nargs="*", default=benched, choices=benched)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default="bench.json")
    parser.add_argument(
        "--parts", nargs="+", default=["throughput", "engines"], choices=["throughput", "engines"],
        help="throughput: training and inference vs plain PyTorch; engines: CPU inference engines on a real sample",
    )  # fmt: skip
    parser.add_argument(
        "--data",
        default=None,
        help="folder of the real samples (default $MEDSEG_DATA_ROOT or ../shared/data)",
    )
    parser.add_argument(
        "--ckpt", nargs="*", default=[], metavar="STUDY=PATH", help="trained weights for the engines' Dice"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    results: dict[str, Any] = {
        "device": device_description(),
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "studies": {},
    }
    # a fresh process per study: its peak memory is that study's alone
    context = multiprocessing.get_context("spawn")
    for study in args.studies if "throughput" in args.parts else []:
        print(f"bench {study} ...", flush=True)
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            results["studies"][study] = pool.submit(
                _bench_in_process, study, args.steps, args.warmup, settings(study)
            ).result()
        print(json.dumps(results["studies"][study], indent=1), flush=True)
    if "engines" in args.parts:
        import os

        data = Path(
            args.data or os.environ.get("MEDSEG_DATA_ROOT") or project_root().parent / "shared" / "data"
        )
        ckpts = dict(c.split("=", 1) for c in args.ckpt)
        results["cpu_engines"] = {}
        for study in args.studies:
            root = data / ENGINE_SAMPLES[study]
            if not root.is_dir() and not ENGINE_SAMPLES[study].endswith("synthetic"):
                print(f"engines {study}: skipped, no {root}", flush=True)
                continue
            print(f"engines {study} ...", flush=True)
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                results["cpu_engines"][study] = pool.submit(
                    _engines_in_process, study, str(root) if root.is_dir() else None, args.steps, args.warmup,
                    ckpts.get(study),
                ).result()  # fmt: skip
            print(json.dumps(results["cpu_engines"][study], indent=1), flush=True)
    validate(results)
    Path(args.output).write_text(json.dumps(results, indent=1))
    if results["studies"]:
        print(table(results))
    if results.get("cpu_engines"):
        print(engine_table(results["cpu_engines"]))
    host = f"{results['device']} ({results['cpu']}), torch {results['torch']}, {results['threads']} threads"
    print(f"measured on {host}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
