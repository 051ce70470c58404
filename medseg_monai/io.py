"""Image-reading helpers for formats MONAI's readers take literally."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["apply_palette"]


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
