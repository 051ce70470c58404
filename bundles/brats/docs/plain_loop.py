"""The peer of the `cpu_real` recipe (issue #37): the plain PyTorch loop a user would write instead,
MONAI's BasicUNet on the four modalities at 2 mm (each z-scored over the brain, the brain's box
padded to a multiple of 16), binary whole tumour (labels 1, 2, 4), Dice + cross-entropy, Adam 1e-3,
one brain per step with random flips and intensity jitter, trained for a wall-clock budget
(``--minutes``, the recipe's training time on the same machine). ``--fold k --n_folds 3`` trains
on the other folds of the bundle's cross-validation over every case (``--fold_pool all``) and
prints the whole-tumour Dice of each case of fold k, scored as `evaluate.yaml` scores: on the
case's own 1 mm grid, the whole volume:

    python bundles/brats/docs/plain_loop.py --data_root ../shared/data/brats2018 --fold 0 --n_folds 3

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


def pad_to(t: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """t (1, C, *spatial) cut to box, zero-padded at the far end to the box's size."""
    sizes = [b.stop - b.start - s for s, b in zip(t.shape[2:], box, strict=True)]
    return F.pad(t, [p for n in reversed(sizes) for p in (0, n)])


def load(item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, ...]]:
    """The modalities at 2 mm, each z-scored over the brain, cropped to the brain's box padded to a
    multiple of 16, (1, 4, X, Y, Z); the whole-tumour label at 1 mm, (X, Y, Z); and the 2 mm box."""
    image = np.stack([np.asarray(nib.load(f).dataobj, np.float32) for f in item["image"]])
    label = np.asarray(nib.load(item["label"]).dataobj) > 0
    brain = (image != 0).any(0)
    for c in range(len(image)):
        values = image[c][brain]
        image[c] = np.where(brain, (image[c] - values.mean()) / max(float(values.std()), 1e-8), 0)
    x = F.interpolate(torch.from_numpy(image)[None], scale_factor=0.5, mode="trilinear", align_corners=False)
    nonzero = (x[0] != 0).any(0).nonzero()
    lo, hi = nonzero.min(0).values.tolist(), (nonzero.max(0).values + 1).tolist()
    box = tuple(slice(a, a + 16 * math.ceil((b - a) / 16)) for a, b in zip(lo, hi, strict=True))
    return pad_to(x[(..., *box)], box), torch.from_numpy(label), box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--n_folds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    split = {"data_root": args.data_root, "fold": args.fold, "n_folds": args.n_folds, "fold_pool": "all"}
    try:
        train_items, val_items = (load_datalist("brats2018", split=s, **split) for s in ("train", "val"))
    except DatasetError as e:  # a wrong --data_root or --fold: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    cases = []
    for item in train_items:
        x, label, box = load(item)
        y = F.interpolate(label[None, None].float(), scale_factor=0.5, mode="nearest")[(..., *box)]
        cases.append((x, pad_to(y, box)))
    net = BasicUNet(spatial_dims=3, in_channels=4, out_channels=2, features=(16, 16, 32, 64, 128, 16))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    start, step = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - start < args.minutes * 60:
        x, y = cases[int(torch.randint(len(cases), ()))]
        dims = [d for d in (2, 3, 4) if torch.rand(()) < 0.5]
        x, y = x.flip(dims), y.flip(dims)
        x = x * (1 + 0.1 * torch.randn(1, 4, 1, 1, 1)) + 0.1 * torch.randn(1, 4, 1, 1, 1)
        optimizer.zero_grad()
        loss = loss_fn(net(x), y.long())
        loss.backward()
        optimizer.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step}: loss {loss.item():.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    train_s = time.perf_counter() - start

    net.eval()
    per_case: dict[str, float] = {}
    for item in val_items:
        x, label, box = load(item)
        with torch.no_grad():
            prob = net(x).softmax(1)[:, 1:]
        # back onto the 2 mm grid of the whole volume, then the 1 mm grid, as a user would
        full = torch.zeros(1, 1, *(s // 2 for s in label.shape))  # the 2 mm grid F.interpolate made
        region = tuple(slice(b.start, min(b.stop, s)) for b, s in zip(box, full.shape[2:], strict=True))
        full[(..., *region)] = prob[(..., *(slice(0, r.stop - r.start) for r in region))]
        pred = F.interpolate(full, size=tuple(label.shape), mode="trilinear", align_corners=False)[0, 0] > 0.5
        total = int(pred.sum() + label.sum())
        per_case[item["case_id"]] = float(2 * (pred & label).sum() / total) if total else math.nan
    mean = round(float(np.nanmean(list(per_case.values()))), 4)
    print(json.dumps({"val_dice_wt": mean, "per_case": per_case, "steps": step, "train_s": round(train_s)}))


if __name__ == "__main__":
    main()
