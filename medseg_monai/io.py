"""Files in and out: images MONAI's readers take literally, label PNGs, atomic JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image

__all__ = ["SaveLabelPNGd", "apply_palette", "write_json"]


def write_json(doc: Any, path: str | Path) -> Path:
    """Write ``doc`` as JSON atomically (temp file, then rename): no half-written file is left."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    return out


def apply_palette(image: Image.Image) -> Image.Image:
    """Render a palette ("P") image through its palette to grayscale; other modes pass unchanged.

    Use as ``monai.data.PILReader(converter=apply_palette)``. The JSRT PNGs (Shiraishi et al.,
    AJR 2000) are 8-bit palette images whose palette is inverted (index i shows as 255 - i): the
    raw indices are a negative (bright air, dark heart); the rendered gray is the radiograph as
    displayed, with dark lungs and a bright mediastinum. A colour palette is refused.
    """
    if image.mode != "P":
        return image
    palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    if not (palette[:, 0] == palette[:, 1]).all() or not (palette[:, 1] == palette[:, 2]).all():
        raise ValueError(f"{getattr(image, 'filename', 'image')}: colour palette, expected a grayscale one")
    gray = palette[np.asarray(image), 0]
    return Image.fromarray(gray, mode="L")


class SaveLabelPNGd(MapTransform):
    """Write a 2D prediction as ``<case_id>_label.png`` (uint8 class indices, 0 = background) and
    ``<case_id>_overlay.png`` (the image with classes in colour) into ``output_dir``.

    ``pred`` is (C, H, W) probabilities/one-hot or (1, H, W) indices, at the size the files should
    have; ``image_key`` the (1, H, W) image of the same size. Arrays from ``PILReader`` are (x, y),
    so ``transpose=True`` writes them upright, as the input was stored.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        image_key: str = "image",
        id_key: str = "case_id",
        transpose: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.id_key = id_key
        self.transpose = transpose

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        # imported here: both import the data package, which imports this module
        from medseg_monai.transforms import class_indices
        from medseg_monai.visualize import blend_labels

        d = dict(data)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        image = torch.as_tensor(d[self.image_key]).detach().cpu().float()[0].numpy()
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).detach().cpu()
            classes = (class_indices(pred)[0] if pred.shape[0] > 1 else pred[0]).numpy().astype(np.uint8)
            img = image
            if self.transpose:
                classes, img = classes.T, img.T
            stem = self.output_dir / str(d[self.id_key])
            Image.fromarray(classes, mode="L").save(f"{stem}_label.png")
            Image.fromarray(blend_labels(img, classes)).save(f"{stem}_overlay.png")
        return d
