"""Files out: JSON written atomically. (The label PNG saver and the JSRT palette converter moved to
:mod:`medseg_monai.transforms.io`.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medseg_monai.deprecation import moved_names

__all__ = ["write_json"]


def write_json(doc: Any, path: str | Path) -> Path:
    """Write ``doc`` as JSON atomically (temp file, then rename): no half-written file is left."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    return out


# moved to medseg_monai.transforms (#38); the old paths work one more release
__getattr__ = moved_names(
    __name__, {"SaveLabelPNGd": "medseg_monai.transforms", "apply_palette": "medseg_monai.transforms"}
)
