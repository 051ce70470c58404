"""medseg-monai: shared extensions for the suite's MONAI bundles.

Submodules load on first use (``medseg_monai.bundle``, ``medseg_monai.data``, ...), so a bundle
config's single ``$import medseg_monai`` makes every one of them reachable from its expressions.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
