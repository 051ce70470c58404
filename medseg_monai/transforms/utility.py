"""Utility transforms: apply a transform to some items only."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

from monai.transforms import Transform

__all__ = ["OnCopiesd"]


class OnCopiesd(Transform):
    """Apply ``transform`` to the items marked as copies (``data[mark_key]`` true, see
    :func:`medseg_monai.data.added_copies`) and pass the others through unchanged."""

    def __init__(self, transform: Callable[[Any], Any], mark_key: str = "copy") -> None:
        self.transform = transform
        self.mark_key = mark_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        return self.transform(data) if data.get(self.mark_key) else data
