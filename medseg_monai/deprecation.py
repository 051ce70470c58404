"""Old import paths kept for one release: a module's PEP 562 ``__getattr__`` that serves names which
moved elsewhere, with a ``DeprecationWarning`` naming the new path (configs may still say
``_target_: medseg_monai.slices.SliceDataset``)."""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names"]


def moved_names(
    old_module: str, new_modules: Mapping[str, str], load_submodules: bool = False
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module``: ``name`` in ``new_modules`` is imported from the
    module named there, warning that ``old_module.name`` is deprecated; with ``load_submodules`` (a
    package) a submodule loads on first use, as ``medseg_monai``'s do; any other name is missing."""

    def __getattr__(name: str) -> Any:
        new_module = new_modules.get(name)
        if new_module is None and load_submodules and importlib.util.find_spec(f"{old_module}.{name}"):
            return importlib.import_module(f"{old_module}.{name}")
        if new_module is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"{old_module}.{name} is deprecated and goes in the next release: use {new_module}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_module), name)

    return __getattr__
