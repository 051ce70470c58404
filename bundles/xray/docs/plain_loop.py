"""The peer of the `cpu_real` recipe (issue #9): the plain PyTorch loop a user would write instead,
MONAI's BasicUNet on the JSRT radiographs at 256 px (background, lungs, heart), Dice + cross-entropy,
Adam 1e-3, batch 4, 40 epochs, no augmentation. It trains on the registry's ``train`` split of
``--data_root`` and prints the lungs and heart Dice of its ``val`` split (8 images no recipe was
chosen on), scored as `evaluate.yaml` scores: probabilities upsampled bilinearly to the
radiograph's 2048 px, the reference masks (1024 px) resized to it by nearest neighbour.
``--fold k --n_folds 5`` trains and scores fold k of the bundle's cross-validation instead
(the same folds as the bundle's ``--fold k --n_folds 5``):

    python bundles/xray/docs/plain_loop.py --data_root ../shared/data/jsrt-scr

The figures it gave are in this folder's README ("The plain loop beside the recipe")."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from PIL import Image

from medseg_monai.data import DatasetError
from medseg_monai.data.datalist import load_datalist

SIZE = 256


def load(item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The radiograph as read (the palette applied: lungs dark), scaled to [0, 1], (1, 2048, 2048),
    and its label (0 background, 1 lungs, 2 heart), (2048, 2048)."""
    image = np.asarray(Image.open(item["xray"]).convert("L"), np.float32) / 255.0
    masks = {Path(p).parent.name: np.asarray(Image.open(p).convert("L")) > 0 for p in item["label"]}
    label = np.zeros(masks["heart"].shape, np.int64)
    label[masks["left_lung"] | masks["right_lung"]] = 1
    label[masks["heart"]] = 2
    full = F.interpolate(torch.from_numpy(label)[None, None].float(), size=image.shape, mode="nearest")
    return torch.from_numpy(image)[None], full[0, 0].long()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, default=None, help="one fold of a k-fold cross-validation")
    parser.add_argument("--n_folds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    split = {"data_root": args.data_root, "fold": args.fold, "n_folds": args.n_folds}
    try:
        train_items, val_items = (load_datalist("jsrt-scr", split=s, **split) for s in ("train", "val"))
    except DatasetError as e:  # a wrong --data_root or --fold: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    train = [load(it) for it in train_items]
    x_all = torch.stack([F.interpolate(x[None], size=(SIZE, SIZE), mode="area")[0] for x, _ in train])
    y_all = torch.stack(
        [F.interpolate(y[None, None].float(), size=(SIZE, SIZE), mode="nearest")[0].long() for _, y in train]
    )
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order, total = torch.randperm(len(x_all)), 0.0
        for i in range(0, len(order), 4):
            pick = order[i : i + 4]
            optimizer.zero_grad()
            loss = loss_fn(net(x_all[pick]), y_all[pick])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(pick)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / len(order):.4f}, {time.perf_counter() - start:.0f} s"
        )
    train_s = time.perf_counter() - start

    net.eval()
    classes = {"lungs": 1, "heart": 2}
    per_case: dict[str, dict[str, float]] = {}
    for item in val_items:
        x, y = load(item)
        with torch.no_grad():
            logits = net(F.interpolate(x[None], size=(SIZE, SIZE), mode="area"))
            pred = F.interpolate(logits.softmax(1), size=y.shape, mode="bilinear").argmax(1)[0]
        dice: dict[str, float] = {}
        per_case[item["case_id"]] = dice
        for name, c in classes.items():
            p, r = pred == c, y == c
            dice[name] = float(2 * (p & r).sum() / (p.sum() + r.sum()))
    result = {k: round(float(np.mean([d[k] for d in per_case.values()])), 4) for k in classes}
    print(json.dumps({"val_dice": result, "per_image": per_case, "train_s": round(train_s)}))


if __name__ == "__main__":
    main()
