"""Copy a JSRT/SCR folder with every radiograph stored in a narrow grey range (issue #37): each image
rendered to grey (through its palette) and its 0-255 values mapped to ``--low``-``--high`` and rounded,
as the unseen JSRT files stored at 239-254 of 255 are (nearly white, posterised); the masks are
copied as they are. Evaluating a model on the copy measures what a narrow stored range costs it:

    python bundles/xray/docs/narrow_range.py --data_root ../shared/data/jsrt-scr --output /tmp/jsrt-narrow
    python -m medseg_monai.bundle xray --mode evaluate --ckpt_path <run>/model_final.pt \\
        --data_root /tmp/jsrt-narrow --split val

The figures it gave are in this folder's README ("Images stored in a narrow grey range")."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from medseg_monai.transforms import apply_palette


def narrow(image: Image.Image, low: int, high: int) -> Image.Image:
    """The image as grey (mode "L") with 0-255 mapped linearly onto low-high and rounded."""
    grey = np.asarray(apply_palette(image).convert("L"), dtype=np.float64)
    return Image.fromarray(np.round(low + (high - low) * grey / 255).astype(np.uint8), mode="L")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", type=Path, required=True, help="a JSRT/SCR folder (images/, masks/)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--low", type=int, default=239)
    parser.add_argument("--high", type=int, default=254)
    args = parser.parse_args()
    images = sorted((args.data_root / "images").glob("*.png"))
    if not images or not (args.data_root / "masks").is_dir():
        raise SystemExit(f"error: {args.data_root} holds no images/*.png and masks/ (a JSRT/SCR folder)")
    if not 0 <= args.low < args.high <= 255:
        raise SystemExit(f"error: need 0 <= --low < --high <= 255, got {args.low}, {args.high}")
    (args.output / "images").mkdir(parents=True, exist_ok=True)
    # copied, not linked: the data registry refuses a path that resolves outside its data root
    shutil.copytree(args.data_root / "masks", args.output / "masks", dirs_exist_ok=True)
    for path in images:
        with Image.open(path) as image:
            narrow(image, args.low, args.high).save(args.output / "images" / path.name)
    print(f"{len(images)} images stored at {args.low}-{args.high} of 255 in {args.output / 'images'}")


if __name__ == "__main__":
    main()
