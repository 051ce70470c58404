"""The peer of the `cpu_real` recipe (issue #36): the plain PyTorch loop a user would write instead,
MONAI's BasicUNet on 2D short-axis slices resized to 160 px (background, RV cavity, myocardium, LV
cavity), Dice + cross-entropy, Adam 1e-3, batches of 8 slices with random flips, rotations and
intensity jitter, trained for a wall-clock budget (``--minutes``, the recipe's training time on the
same machine). ``--fold k --n_folds 4`` trains on the other folds of the bundle's patient-grouped
cross-validation over every case (``--fold_pool all``) and prints the Dice of each frame of fold k,
scored as `evaluate.yaml` scores: on each frame's own grid, per structure, over the whole stack:

    python bundles/lv/docs/plain_loop.py --data_root ../shared/data/acdc --fold 0 --n_folds 4

The figures it gave are in this folder's README ("A CPU recipe for real data")."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from medseg_monai.data import DatasetError
from medseg_monai.data.datalist import load_datalist

SIZE = 160
CLASSES = {"rv_cavity": 1, "myocardium": 2, "lv_cavity": 3}


def load(item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame z-scored, (slices, 1, X, Y), and its label (slices, X, Y) of ACDC values."""
    image = np.asarray(nib.load(item["image"][0]).dataobj, np.float32)
    label = np.asarray(nib.load(item["label"]).dataobj, np.int64)
    image = (image - image.mean()) / max(float(image.std()), 1e-8)
    return torch.from_numpy(image).permute(2, 0, 1)[:, None], torch.from_numpy(label).permute(2, 0, 1)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(x, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))


def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, a rotation up to 30 degrees and intensity jitter, per slice of a batch."""
    n = len(x)
    angle = (torch.rand(n) * 2 - 1) * math.pi / 6
    flip = torch.where(torch.rand(n, 2) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1
    )
    theta[:, :, :2] *= flip[:, None, :]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    x = x * (1 + 0.1 * torch.randn(n, 1, 1, 1)) + 0.1 * torch.randn(n, 1, 1, 1)
    return x, y[:, 0].long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--n_folds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    split = {"data_root": args.data_root, "fold": args.fold, "n_folds": args.n_folds, "fold_pool": "all"}
    try:
        train_items, val_items = (load_datalist("acdc", split=s, **split) for s in ("train", "val"))
    except DatasetError as e:  # a wrong --data_root or --fold: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    frames = [load(it) for it in train_items]
    x_all = torch.cat([resize(x, (SIZE, SIZE), "bilinear") for x, _ in frames])
    y_all = torch.cat([resize(y[:, None].float(), (SIZE, SIZE), "nearest")[:, 0].long() for _, y in frames])
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=4, features=(16, 32, 64, 128, 256, 16))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    start, step = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - start < args.minutes * 60:
        pick = torch.randint(len(x_all), (8,))
        x, y = augment(x_all[pick], y_all[pick])
        optimizer.zero_grad()
        loss = loss_fn(net(x), y[:, None])
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    train_s = time.perf_counter() - start

    net.eval()
    per_case: dict[str, dict[str, float]] = {}
    for item in val_items:
        x, y = load(item)
        with torch.no_grad():
            probs = net(resize(x, (SIZE, SIZE), "bilinear")).softmax(1)
            pred = resize(probs, tuple(y.shape[1:]), "bilinear").argmax(1)
        dice: dict[str, float] = {}
        for name, c in CLASSES.items():
            p, r = pred == c, y == c
            total = int(p.sum() + r.sum())
            dice[name] = float(2 * (p & r).sum() / total) if total else math.nan
        per_case[item["case_id"]] = dice
    result = {k: round(float(np.nanmean([d[k] for d in per_case.values()])), 4) for k in CLASSES}
    print(json.dumps({"val_dice": result, "per_frame": per_case, "steps": step, "train_s": round(train_s)}))


if __name__ == "__main__":
    main()
