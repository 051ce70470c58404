"""The peer of the `cpu_real` recipe (issue #9): the plain PyTorch loop a user would write
instead, MONAI's BasicUNet on single clinical FLAIR slices (512 px averaged to 256, z-score over
the brain), Dice + focal loss, Adam 1e-3, random flips and intensity jitter, 79 steps of 8 slices.
It trains on every case of ``--data_root`` except ``--held_out`` and prints that volume's Dice,
recall and precision at probability 0.5, computed at 512 px (the logits upsampled bilinearly):

    python bundles/wmh/docs/plain_loop.py --data_root ../shared/data/wmh-clinical-flair --held_out 2516043217

The figures it gave are in this folder's README ("The plain loop beside the recipe")."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from monai.networks.nets import BasicUNet


def load(case: Path) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR z-scored over its non-zero (brain) voxels and the binary lesion mask, (X, Y, slices)."""
    image = nib.load(case / "t2flair-stripped.nii.gz").get_fdata().astype(np.float32)
    label = (nib.load(case / "gt.nii.gz").get_fdata() > 0.5).astype(np.float32)
    brain = image[image > 0]
    return (image - brain.mean()) / brain.std(), label


def slices(volume: np.ndarray) -> torch.Tensor:
    """(X, Y, S) -> (S, 1, X / 2, Y / 2): each slice averaged over 2 x 2 pixels."""
    return F.avg_pool2d(torch.from_numpy(np.moveaxis(volume, 2, 0).copy())[:, None], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", type=Path, required=True)
    parser.add_argument("--held_out", required=True, help="the case folder to score, never trained on")
    parser.add_argument("--steps", type=int, default=79)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.data_root / args.held_out).is_dir():
        raise SystemExit(f"--held_out {args.held_out} is not a case folder of {args.data_root}")
    cases = sorted(p for p in args.data_root.iterdir() if p.is_dir() and p.name != args.held_out)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    loaded = [load(c) for c in cases]
    x_all = torch.cat([slices(image) for image, _ in loaded])
    y_all = (torch.cat([slices(label) for _, label in loaded]) >= 0.5).float()
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1)
    loss_fn = DiceFocalLoss(sigmoid=True, batch=True)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        pick = torch.from_numpy(rng.choice(len(x_all), 8, replace=False))
        x, y = x_all[pick].clone(), y_all[pick].clone()
        for b in range(len(x)):
            for axis in (1, 2):
                if rng.random() < 0.5:
                    x[b], y[b] = x[b].flip(axis), y[b].flip(axis)
            x[b] = x[b] * (1 + rng.uniform(-0.1, 0.1)) + rng.uniform(-0.1, 0.1)
        optimizer.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(
                f"step {step + 1}/{args.steps}: loss {loss.item():.4f}, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    train_s = time.perf_counter() - start

    net.eval()
    image, label = load(args.data_root / args.held_out)
    full = torch.from_numpy(np.moveaxis(image, 2, 0).copy())[:, None]
    with torch.no_grad():
        logits = torch.cat([net(F.avg_pool2d(full[i : i + 4], 2)) for i in range(0, len(full), 4)])
        prob = torch.sigmoid(F.interpolate(logits, size=full.shape[2:], mode="bilinear"))[:, 0].numpy()
    pred, ref = np.moveaxis(prob, 0, 2) >= 0.5, label > 0
    tp, fp, fn = (pred & ref).sum(), (pred & ~ref).sum(), (~pred & ref).sum()
    result = {
        "held_out": args.held_out,
        "trained_on": [c.name for c in cases],
        "dice": float(2 * tp / (2 * tp + fp + fn)),
        "recall": float(tp / max(tp + fn, 1)),
        "precision": float(tp / max(tp + fp, 1)),
        "train_s": round(train_s),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
