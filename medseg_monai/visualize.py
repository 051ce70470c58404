"""Overlay figures (PNG): image, reference, prediction and errors side by side; predictions over a
few slices of a segmented volume. The transforms that save them for predictions are in
:mod:`medseg_monai.transforms.io`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw

from medseg_monai.deprecation import moved_names

__all__ = [
    "CLASS_COLOURS",
    "OverlaySaver",
    "blend_labels",
    "colour_labels",
    "overlay_panels",
    "volume_overlay",
]

# background black, then red, green, blue, yellow, magenta, cyan: class c of the poster's fig. 6 is
# (R, G, B)[c - 1] for the first three classes.
CLASS_COLOURS = np.array(
    [[0, 0, 0], [230, 40, 40], [40, 200, 40], [50, 90, 255], [240, 220, 30], [220, 40, 220], [30, 220, 220]],
    dtype=np.uint8,
)


def _gray(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5])
    scaled = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def colour_labels(label: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours."""
    return CLASS_COLOURS[np.asarray(label, dtype=np.int64) % len(CLASS_COLOURS)]


def _blend(gray: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    colour = colour_labels(label).astype(np.float32)
    mask = (label > 0)[..., None]
    return np.where(mask, (1 - alpha) * gray + alpha * colour, gray).astype(np.uint8)


def blend_labels(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(H, W) image and class indices -> (H, W, 3) uint8: the image in gray, classes in colour."""
    return _blend(_gray(np.asarray(image, dtype=np.float32)), np.asarray(label).astype(np.int64))


def overlay_panels(image: np.ndarray, label: np.ndarray, pred: np.ndarray, title: str = "") -> Image.Image:
    """Four panels of one 2D image (H, W): image, reference, prediction, errors.

    The error panel marks every misclassified pixel in the colour of its true class (background
    as white), as in the X-ray poster's fig. 6; correct pixels stay gray.
    """
    gray = _gray(np.asarray(image, dtype=np.float32))
    label, pred = np.asarray(label).astype(np.int64), np.asarray(pred).astype(np.int64)
    errors = gray.copy() // 2
    wrong = label != pred
    errors[wrong] = colour_labels(label)[wrong]
    errors[wrong & (label == 0)] = 255
    panels = [gray, _blend(gray, label), _blend(gray, pred), errors]
    names = ["image", "reference", "prediction", f"errors ({int(wrong.sum())} px)"]
    zoom = max(1, 256 // max(gray.shape[:2]))  # small validation images stay legible
    if zoom > 1:
        panels = [np.kron(p, np.ones((zoom, zoom, 1), dtype=np.uint8)) for p in panels]
    h, w = panels[0].shape[:2]
    canvas = Image.new("RGB", (4 * w, h + 16), "black")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, name) in enumerate(zip(panels, names, strict=True)):
        canvas.paste(Image.fromarray(panel), (i * w, 16))
        draw.text((i * w + 4, 2), name if i or not title else f"{name}: {title}", fill="white")
    return canvas


def _class_map(t: Any) -> np.ndarray:
    """(C, *spatial) one-hot/probabilities or (1, *spatial) indices/probabilities -> class indices
    (one channel: >= 0.5 is foreground; negative values, e.g. ignored voxels, count as background)."""
    # imported here: medseg_monai.transforms imports this module's drawing for its saving transforms
    from medseg_monai.transforms.labels import class_indices

    t = torch.as_tensor(t).detach().cpu().float()
    return (class_indices(t)[0].long() if t.shape[0] > 1 else (t[0] >= 0.5).long()).numpy()


class OverlaySaver:
    """Save :func:`overlay_panels` of the first case an evaluator sees each epoch to ``output_dir/filename``.

    Expects decollated 2D items with, in the output, ``pred`` and ``label`` (one-hot (C, H, W) or
    indices (1, H, W)) and ``image_key`` (C, H, W) of the same size (from the output, else the
    batch; with a list of keys, the first one present). ``transpose`` shows MONAI's (x, y) arrays (e.g. from ``PILReader``) upright.
    """

    rank0_only: ClassVar[bool] = True  # one picture: rank 0 saves it (runtime.for_this_rank)

    def __init__(
        self,
        output_dir: str,
        filename: str = "overlay.png",
        transpose: bool = True,
        image_key: str | list[str] = "image",
        slice_axis: int = -1,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.transpose = transpose
        self.image_keys = [image_key] if isinstance(image_key, str) else list(image_key)
        self.slice_axis = slice_axis

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if (engine.state.iteration - 1) % engine.state.epoch_length:
            return
        item, output = engine.state.batch[0], engine.state.output[0]
        key = next((k for k in self.image_keys if k in output or k in item), self.image_keys[-1])
        source = output if key in output else item
        image = torch.as_tensor(source[key]).detach().cpu()[0].float().numpy()
        label, pred = _class_map(output["label"]), _class_map(output["pred"])
        if image.ndim == 3:  # a volume: show the slice with the most reference foreground
            axis = self.slice_axis % 3
            counts = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
            z = int(counts.argmax()) if counts.any() else image.shape[axis] // 2
            image, label, pred = (np.take(a, z, axis=axis) for a in (image, label, pred))
        if self.transpose:
            image, label, pred = image.T, label.T, pred.T
        self.path.parent.mkdir(parents=True, exist_ok=True)
        overlay_panels(image, label, pred, title=str(item.get("case_id", ""))).save(self.path)


def volume_overlay(image: np.ndarray, label: np.ndarray, n_slices: int = 4, axis: int = -1) -> Image.Image:
    """A row of ``n_slices`` slices of a volume along ``axis`` with ``label`` (class indices) in
    colour: the slices with most foreground (in slice order), or evenly spaced ones when there is
    none. ``image`` and ``label`` are (X, Y, Z) arrays of one grid; slices are shown upright."""
    image, label = np.asarray(image, dtype=np.float32), np.asarray(label).astype(np.int64)
    axis = axis % image.ndim
    counts = (label > 0).sum(axis=tuple(a for a in range(label.ndim) if a != axis))
    depth = image.shape[axis]
    if counts.any():
        picks = sorted(np.argsort(-counts, kind="stable")[: min(n_slices, int((counts > 0).sum()))].tolist())
    else:
        picks = np.linspace(0, depth - 1, min(n_slices, depth)).round().astype(int).tolist()
    panels = [
        blend_labels(np.take(image, z, axis=axis).T, np.take(label, z, axis=axis).T)[::-1] for z in picks
    ]
    return Image.fromarray(np.concatenate(panels, axis=1))


# moved to medseg_monai.transforms (#38); the old path works one more release
__getattr__ = moved_names(__name__, {"SaveVolumeOverlayd": "medseg_monai.transforms"})
