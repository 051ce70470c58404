"""``make bench``: throughput of each bundle's training step and inference, against a plain
PyTorch loop over the same network, loss, optimiser and pre-loaded tensors.

The engine's overhead (MONAI ``SupervisedTrainer`` with the bundle's gradient clipping, Ignite
events, batch preparation) is the ratio ``engine_s / plain_s`` per step; the target is <= 1.2.
Results go to JSON (``--output``, default ``bench.json``) with the device and versions.

    python -m medseg_monai.bench [--studies xray] [--image_size 256] [--steps 5] [--output bench.json]
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

from medseg_monai.paths import project_root
from medseg_monai.tracking import device_description

__all__ = ["bench_xray", "main", "time_steps"]


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


def _bundle_parts(study: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(project_root() / "bundles" / study / "configs" / "train.yaml"))
    parser.update(overrides)
    return {k: parser.get_parsed_content(k) for k in ("network", "loss", "optimizer", "device", "amp")} | {
        "grad_clip_norm": parser.get_parsed_content("grad_clip_norm"),
        "num_classes": parser.get_parsed_content("num_classes"),
    }


def bench_xray(image_size: int = 256, batch_size: int = 4, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Training images/s and inference images/s of the X-ray bundle's default network."""
    from monai.engines import SupervisedTrainer

    from medseg_monai.handlers import GradientClipping

    parts = _bundle_parts("xray", {"dataset": "jsrt-scr", "image_size": image_size, "batch_size": batch_size})
    net, loss_fn, opt, device, amp = (parts[k] for k in ("network", "loss", "optimizer", "device", "amp"))
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((batch_size, 1, image_size, image_size), generator=gen).to(device)
    labels = torch.randint(0, parts["num_classes"], (batch_size, 1, image_size, image_size), generator=gen).to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(images), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), parts["grad_clip_norm"])
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
            train_handlers=[GradientClipping(parts["grad_clip_norm"])],
        )

    net.train()
    plain = time_steps(plain_step, steps, warmup, device)
    make_trainer(warmup).run()
    trainer = make_trainer(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    engine = (time.perf_counter() - start) / steps
    net.eval()

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            net(images)

    infer = time_steps(infer_step, steps, warmup, device)
    return {
        "image_size": image_size,
        "batch_size": batch_size,
        "amp": bool(amp),
        "train_plain_s_per_step": plain,
        "train_engine_s_per_step": engine,
        "train_images_per_s": batch_size / engine,
        "train_plain_images_per_s": batch_size / plain,
        "engine_overhead_ratio": engine / plain,
        "inference_images_per_s": batch_size / infer,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


BENCHES: dict[str, Callable[..., dict[str, Any]]] = {"xray": bench_xray}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
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
        results[study] = BENCHES[study](args.image_size, args.batch_size, args.steps, args.warmup)
        print(json.dumps(results[study], indent=1), flush=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
