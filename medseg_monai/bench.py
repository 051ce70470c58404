"""``make bench``: throughput of each bundle's training step and inference, against a plain
PyTorch loop over the same network, loss, optimiser and pre-loaded tensors.

Each bundle says what to measure in ``configs/bench.yaml`` (overrides for its train.yaml, the shapes
of one training batch and one inference input, optional ``variants``: named overrides whose
training step is timed too); this module builds the bundle through the launcher
and times it. The engine's overhead (MONAI ``SupervisedTrainer`` with the bundle's own training
handlers, Ignite events, batch preparation) is the ratio ``engine_s / plain_s`` per step. Results go
to JSON (``--output``, default ``bench.json``) with the device and versions.

    python -m medseg_monai.bench [--studies wmh xray] [--steps 5] [--warmup 2] [--output bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from medseg_monai.bundle import config_files, config_parser, studies
from medseg_monai.paths import project_root
from medseg_monai.record import device_description

__all__ = ["bench_study", "main", "time_steps", "train_throughput"]


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``step`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def settings(study: str) -> dict[str, Any]:
    """The bundle's ``configs/bench.yaml``."""
    return yaml.safe_load((project_root() / "bundles" / study / "configs" / "bench.yaml").read_text())


def _bundle_parts(study: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The bundle's own network, loss, optimiser, training handlers, inferer, device and AMP flag."""
    parser = config_parser(config_files(study), overrides)
    keys = ("network", "loss", "optimizer", "train_handlers", "val_inferer", "device", "amp")
    return {k: parser.get_parsed_content(k) for k in keys}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_throughput(
    parts: dict[str, Any], images: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int
) -> dict[str, float]:
    """Seconds per step of a plain PyTorch loop and of MONAI's ``SupervisedTrainer`` with the bundle's
    training handlers, over the same network, loss, optimiser and pre-loaded batch. The plain loop
    clips gradients as the bundle's ``GradientClipping`` handler does, when it has one."""
    from monai.engines import SupervisedTrainer

    from medseg_monai.handlers import GradientClipping

    net, loss_fn, opt, device, amp = (parts[k] for k in ("network", "loss", "optimizer", "device", "amp"))
    handlers = [h for h in parts["train_handlers"] if h is not None]
    clip = next((h.max_norm for h in handlers if isinstance(h, GradientClipping)), None)
    images, labels = images.to(device), labels.to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(images), labels)
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
            train_handlers=handlers,
        )

    net.train()
    plain = time_steps(plain_step, steps, warmup, device)
    make_trainer(warmup).run()
    engine = time_steps(make_trainer(steps).run, 1, 0, device) / steps
    return {
        "train_plain_s_per_step": plain,
        "train_engine_s_per_step": engine,
        "engine_overhead_ratio": engine / plain,
    }


def bench_study(study: str, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Training samples/s through the bundle vs a plain loop, and seconds per inference input through
    the bundle's ``val_inferer``, with the tensors of the bundle's ``bench.yaml``."""
    cfg = settings(study)
    parts = _bundle_parts(study, cfg.get("overrides", {}))
    gen = torch.Generator().manual_seed(0)
    train = cfg["train"]
    images = torch.randn(train["image"], generator=gen)
    labels = torch.randint(0, train["classes"], train["label"], generator=gen).float()
    result = train_throughput(parts, images, labels, steps, warmup)
    net, device, amp, inferer = parts["network"], parts["device"], parts["amp"], parts["val_inferer"]
    net.eval()
    volume = torch.randn(cfg["inference"]["image"], generator=gen).to(device)

    def infer() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            inferer(volume, net)

    per_call = time_steps(infer, max(1, steps // 2), 1, device)
    batch, unit, per = train["image"][0], cfg.get("unit", "samples"), cfg["inference"].get("per", 1)
    variants = {}  # the same step with other settings, e.g. the LV study's full 3x3x3 convolutions
    for name, extra in (cfg.get("variants") or {}).items():
        other = _bundle_parts(study, {**cfg.get("overrides", {}), **extra})
        timed = train_throughput(other, images, labels, steps, warmup)
        variants[name] = {
            "overrides": extra,
            "parameters": sum(p.numel() for p in other["network"].parameters()),
            "train_plain_s_per_step": timed["train_plain_s_per_step"],
            "train_engine_s_per_step": timed["train_engine_s_per_step"],
        }
    return {
        "overrides": cfg.get("overrides", {}),
        "amp": bool(amp),
        "train_batch_shape": train["image"],
        **result,
        f"train_{unit}_per_s": batch / result["train_engine_s_per_step"],
        f"train_plain_{unit}_per_s": batch / result["train_plain_s_per_step"],
        "inference_input_shape": cfg["inference"]["image"],
        "inference_s_per_input": per_call / per,
        "peak_memory_mb": _peak_memory_mb(device),
        "parameters": sum(p.numel() for p in net.parameters()),
        **({"variants": variants} if variants else {}),
    }


def main(argv: list[str] | None = None) -> int:
    benched = [s for s in studies() if (project_root() / "bundles" / s / "configs" / "bench.yaml").is_file()]
    parser = argparse.ArgumentParser(prog="medseg-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", nargs="*", default=benched, choices=benched)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default="bench.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "device": device_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for study in args.studies:
        print(f"bench {study} ...", flush=True)
        results[study] = bench_study(study, steps=args.steps, warmup=args.warmup)
        print(json.dumps(results[study], indent=1), flush=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
