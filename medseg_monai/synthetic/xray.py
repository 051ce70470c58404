"""Synthetic posterior-anterior chest radiographs in the JSRT/SCR layout.

16-bit PNGs (``images/<id>.IMG.png``, usual polarity: air and lungs dark, bone and mediastinum
bright) with SCR-style binary GIF masks at half resolution (``masks/<structure>/<id>.gif``, 0/255)
for heart, left/right lungs and clavicles. SCR left/right are the patient's: ``left_lung`` lies on
the image's right. Per case: body size and position, lung and heart shapes (elastic deformation),
ribs, clavicles, spine, exposure gradient and noise vary. Lungs are about as dark as the air
outside the body and ribs cross them, so no global threshold isolates them. The phantoms test the
pipeline; they reproduce nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medseg_monai.synthetic._common import Progress, case_rng

STRUCTURES = ("heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle")


def _smooth(rng: np.random.Generator, shape: tuple[int, int], ctrl: int = 6) -> np.ndarray:
    """A smooth random field in [-1, 1]: cubic upsampling of a coarse grid to 64^2, then linear."""
    coarse = ndimage.zoom(rng.uniform(-1, 1, (ctrl, ctrl)), 64 / ctrl, order=3, mode="nearest")
    return ndimage.zoom(coarse, (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1]), order=1)


def _shapes(u: np.ndarray, v: np.ndarray, g: dict[str, float]) -> dict[str, np.ndarray]:
    """Signed distances (negative inside, in image-width units) of the anatomy at (u, v) in [0, 1]^2."""

    def ell(cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        return (np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2) - 1) * min(ru, rv)

    def capsule(p0: tuple[float, float], p1: tuple[float, float], r: float) -> np.ndarray:
        d = np.array(p1) - np.array(p0)
        t = np.clip(((u - p0[0]) * d[0] + (v - p0[1]) * d[1]) / (d @ d), 0, 1)
        return np.hypot(u - p0[0] - t * d[0], v - p0[1] - t * d[1]) - r

    s, cu, cv = g["scale"], g["cu"], g["cv"]
    body = ell(cu, cv + 0.12 * s, 0.44 * s, 0.62 * s)
    neck = ell(cu, cv - 0.42 * s, 0.09 * s, 0.2 * s)
    heart = ell(cu + 0.07 * s, cv + 0.16 * s, g["heart_w"] * s, 0.13 * s)
    # lungs: rounded tops, wider at the base, medial edge cut by the mediastinum
    right = np.maximum(ell(cu - 0.2 * s, cv + 0.02 * s, 0.13 * s, 0.29 * s), u - (cu - 0.04 * s))
    left = np.maximum(ell(cu + 0.2 * s, cv + 0.0 * s, 0.125 * s, 0.28 * s), (cu + 0.05 * s) - u)
    left = np.maximum(left, -heart + 0.006)  # the heart displaces the left lung's medial base
    right = np.maximum(right, -heart + 0.006)
    clav_r = capsule((cu - 0.36 * s, cv - 0.28 * s), (cu - 0.06 * s, cv - 0.22 * s), 0.016 * s)
    clav_l = capsule((cu + 0.36 * s, cv - 0.28 * s), (cu + 0.06 * s, cv - 0.22 * s), 0.016 * s)
    spine = np.abs(u - cu) - 0.035 * s
    return {
        "body": np.minimum(body, neck),
        "heart": heart,
        "right_lung": right,
        "left_lung": left,
        "right_clavicle": clav_r,
        "left_clavicle": clav_l,
        "spine": spine,
    }


def _case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    g = {
        "scale": rng.uniform(0.9, 1.05),
        "cu": 0.5 + rng.uniform(-0.03, 0.03),
        "cv": 0.42 + rng.uniform(-0.03, 0.03),
        "heart_w": rng.uniform(0.13, 0.17),
    }
    warp = [_smooth(rng, (64, 64), 5) * 0.025 for _ in range(2)]  # elastic displacement, image-width units

    def coords(n: int) -> tuple[np.ndarray, np.ndarray]:
        v, u = np.mgrid[0:n, 0:n].astype(np.float32) / n + 0.5 / n
        du, dv = (ndimage.zoom(w, n / 64, order=1) for w in warp)
        return u + du, v + dv

    u, v = coords(size)
    sdf = _shapes(u, v, g)
    px = 1.0 / size

    def occ(d: np.ndarray) -> np.ndarray:  # partial volume over about one pixel
        return np.clip(0.5 - d / px, 0, 1)

    body, lungs = occ(sdf["body"]), np.maximum(occ(sdf["left_lung"]), occ(sdf["right_lung"]))
    img = 0.08 + 0.42 * body  # air, then soft tissue
    img += 0.2 * np.clip(v - 0.62, 0, 1) * body  # abdomen below the diaphragm
    img -= 0.3 * lungs * (0.8 + 0.2 * _smooth(rng, (size, size)))
    phase = rng.uniform(0, 2 * np.pi)
    ribs = np.clip(np.sin((v + 0.05 * np.cos(np.pi * (u - 0.5) * 3)) * 2 * np.pi * 11 + phase), 0, 1) ** 3
    img += 0.1 * ribs * body * (np.abs(u - g["cu"]) > 0.05)
    img += 0.22 * occ(sdf["heart"]) + 0.18 * occ(sdf["spine"]) * body
    img += 0.2 * np.maximum(occ(sdf["left_clavicle"]), occ(sdf["right_clavicle"]))
    img *= 1 + 0.25 * _smooth(rng, (size, size), 4)  # exposure gradient
    img = ndimage.gaussian_filter(img, 0.8) + rng.normal(0, 0.025, img.shape)
    gain, offset = rng.uniform(0.8, 1.0), rng.uniform(0.0, 0.05)
    image = np.clip((img * gain + offset) * 65535, 0, 65535).astype(np.uint16)

    mu, mv = coords(size // 2)
    msdf = _shapes(mu, mv, g)
    masks = {s: np.where(msdf[s] < 0, 255, 0).astype(np.uint8) for s in STRUCTURES}
    return image, masks


def generate(
    root: Path, seed: int = 0, progress: Progress | None = None, *, n_cases: int = 24, size: int = 512
) -> None:
    """Write ``n_cases`` radiographs of ``size``^2 pixels (masks ``size // 2``) under ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for s in STRUCTURES:
        (root / "masks" / s).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        image, masks = _case(case_rng(seed, i), size)
        case = f"SYNXR{i + 1:03d}"
        Image.fromarray(image).save(root / "images" / f"{case}.IMG.png")
        for s, m in masks.items():
            Image.fromarray(m).save(root / "masks" / s / f"{case}.gif", optimize=False)
        if progress:
            progress(f"xray case {i + 1}/{n_cases}")
