"""``make bench``: throughput of each bundle's training step and inference, against a plain
PyTorch loop over the same network, loss, optimiser and pre-loaded tensors.

The engine's overhead (MONAI ``SupervisedTrainer`` with the bundle's gradient clipping, Ignite
events, batch preparation) is the ratio ``engine_s / plain_s`` per step; the target is <= 1.2.
Results go to JSON (``--output``, default ``bench.json``) with the device and versions.

    python -m medseg_monai.bench [--studies wmh xray] [--image_size 256] [--steps 5] [--output bench.json]
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

__all__ = ["bench_wmh", "bench_xray", "main", "time_steps", "train_throughput"]


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
    """The bundle's own network, loss, optimiser, device and AMP flag, as its train.yaml builds them."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(project_root() / "bundles" / study / "configs" / "train.yaml"))
    parser.update(overrides)
    return {k: parser.get_parsed_content(k) for k in ("network", "loss", "optimizer", "device", "amp")}


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
    clip_norm: float | None = None,
) -> dict[str, float]:
    """Seconds per step of a plain PyTorch loop and of MONAI's ``SupervisedTrainer`` (with the
    bundle's gradient clipping when ``clip_norm``) over the same network, loss, optimiser and
    pre-loaded batch."""
    from monai.engines import SupervisedTrainer

    from medseg_monai.handlers import GradientClipping

    net, loss_fn, opt, device, amp = (parts[k] for k in ("network", "loss", "optimizer", "device", "amp"))
    images, labels = images.to(device), labels.to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(images), labels)
        scaler.scale(loss).backward()
        if clip_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
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
            train_handlers=[GradientClipping(clip_norm)] if clip_norm is not None else None,
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


def bench_xray(image_size: int = 256, batch_size: int = 4, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Training and inference images/s of the X-ray bundle's default network (classic U-Net)."""
    parts = _bundle_parts("xray", {"dataset": "jsrt-scr", "image_size": image_size, "batch_size": batch_size})
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((batch_size, 1, image_size, image_size), generator=gen)
    labels = torch.randint(0, 3, (batch_size, 1, image_size, image_size), generator=gen)
    result = train_throughput(parts, images, labels, steps, warmup, clip_norm=1.0)
    net, device, amp = parts["network"], parts["device"], parts["amp"]
    net.eval()
    images = images.to(device)

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            net(images)

    infer = time_steps(infer_step, steps, warmup, device)
    return {
        "image_size": image_size,
        "batch_size": batch_size,
        "amp": bool(amp),
        **result,
        "train_images_per_s": batch_size / result["train_engine_s_per_step"],
        "train_plain_images_per_s": batch_size / result["train_plain_s_per_step"],
        "inference_images_per_s": batch_size / infer,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def bench_wmh(
    image_size: int = 256, batch_size: int = 12, steps: int = 5, warmup: int = 2, depth: int = 40
) -> dict[str, Any]:
    """Training slices/s of the WMH bundle's default model (UNet256 on 3 neighbouring FLAIR slices,
    focal Tversky, Adam) and seconds per volume of slice-by-slice inference (``depth`` slices)."""
    from medseg_monai.slices import NeighbourSliceInferer

    parts = _bundle_parts(
        "wmh", {"dataset": "wmh2017", "in_plane_size": image_size, "batch_size": batch_size}
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((batch_size, 3, image_size, image_size), generator=gen)
    labels = (torch.rand((batch_size, 1, image_size, image_size), generator=gen) > 0.98).float()
    result = train_throughput(parts, images, labels, steps, warmup)
    net, device, amp = parts["network"], parts["device"], parts["amp"]
    net.eval()
    volume = torch.randn((1, 1, image_size, image_size, depth), generator=gen).to(device)
    inferer = NeighbourSliceInferer(axis=2, neighbours=3, sw_batch_size=batch_size)

    def infer_volume() -> None:
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            inferer(volume, net)

    per_volume = time_steps(infer_volume, max(1, steps // 2), 1, device)
    return {
        "image_size": image_size,
        "batch_size": batch_size,
        "amp": bool(amp),
        **result,
        "train_slices_per_s": batch_size / result["train_engine_s_per_step"],
        "train_plain_slices_per_s": batch_size / result["train_plain_s_per_step"],
        "inference_s_per_volume": per_volume,
        "inference_volume_shape": list(volume.shape[2:]),
        "peak_memory_mb": _peak_memory_mb(device),
    }


BENCHES: dict[str, Callable[..., dict[str, Any]]] = {"wmh": bench_wmh, "xray": bench_xray}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--image_size", type=int, default=256)
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
        results[study] = BENCHES[study](image_size=args.image_size, steps=args.steps, warmup=args.warmup)
        print(json.dumps(results[study], indent=1), flush=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
