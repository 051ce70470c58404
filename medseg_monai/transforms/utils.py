"""Helpers the transform families share (as MONAI's ``monai/transforms/utils.py``): a plain tensor
of an item, an item's values with its metadata, and the file it came from for error lines."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from monai.data import MetaTensor

__all__ = ["plain_tensor", "source_name", "with_meta_of"]


def plain_tensor(x: Any) -> torch.Tensor:
    """A torch tensor without MONAI metadata (e.g. a 2D slice does not share its volume's affine)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def source_name(img: Any, key: Hashable) -> str:
    """The file an item came from (else its key), for error messages."""
    meta = getattr(img, "meta", {}) or {}
    name = meta.get("filename_or_obj", key)
    return str(name[0] if isinstance(name, (list, tuple)) else name)


def with_meta_of(values: torch.Tensor, img: Any) -> Any:
    """``values`` with ``img``'s metadata when ``img`` is a MetaTensor."""
    if isinstance(img, MetaTensor):
        out = MetaTensor(values, meta=img.meta)
        out.applied_operations = list(img.applied_operations)
        return out
    return values
