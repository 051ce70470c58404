"""Synthetic posterior-anterior chest radiographs in the JSRT/SCR layout (``jsrt-scr``).

Models a PA chest film as a sum of projected densities: the body outline (shoulders, neck, soft
tissue thicker in the middle), two dark lung fields with domed hemidiaphragms and sharp costophrenic
angles (darker centrally, brighter at their bases and with vascular markings towards the hila), the
heart (mostly to the image's right of the midline, i.e. the patient's left), mediastinum, trachea,
aortic knob and spine, posterior ribs as curved bright bands with cortical edges, fainter anterior
ribs, S-shaped clavicles and the scapulae, all elastically deformed per case, then a smooth exposure
gradient, detector blur, noise and a 16-bit window (air and lungs dark, bone and mediastinum bright).
Masks (heart, lungs, clavicles; SCR convention: ``left_*`` is the patient's left, the image's right)
are rendered from the same geometry at half the image resolution.  It reproduces no patient or
device; it only gives the chest X-ray pipeline a learnable, non-trivial target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ._common import (
    F32,
    Coords,
    Deformation,
    Progress,
    SmoothField,
    blur,
    case_rng,
    ellipsoid,
    gaussian_noise,
    grid,
    rotate2d,
    smooth_field,
    smooth_union,
    soft,
)

FOV_MM = 358.0  # square detector, like JSRT's 2048 x 0.175 mm
STRUCTURES = ("heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle")


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Per-case geometry (mm; u to the image's right = the patient's left, v downwards)."""
    s = rng.uniform(0.9, 1.04)
    return {
        "s": s,
        "cu": rng.uniform(-10, 10),
        "cv": rng.uniform(-12, 8),
        "heart_a": rng.uniform(60, 74) * s,  # transverse semi-axis: cardiothoracic ratio ~0.4-0.5
        "heart_b": rng.uniform(48, 56) * s,
        "heart_tilt": rng.uniform(0.25, 0.5),
        "dome_r": rng.uniform(72, 90) * s,  # height of the right hemidiaphragm below the centre
        "dome_l": rng.uniform(8, 18) * s,  # the left one is lower
        "lung_h": rng.uniform(115, 128) * s,
        "rib_pitch": rng.uniform(22, 26) * s,
        "rib_phase": rng.uniform(0, 1),
    }


def _sdfs(g: dict[str, float], pts: Coords) -> dict[str, np.ndarray]:
    """Signed distances (mm) of the labelled structures and the body at deformed points ``pts``."""
    v, u = pts
    s, cu, cv = g["s"], g["cu"], g["cv"]
    torso = smooth_union(
        ellipsoid((u, v), (cu, cv + 60 * s), (150 * s, 225 * s)),
        ellipsoid((u, v), (cu, cv - 118 * s), (178 * s, 55 * s)),  # shoulders
        30.0,
    )
    body = smooth_union(torso, ellipsoid((u, v), (cu, cv - 175 * s), (48 * s, 70 * s)), 25.0)  # neck
    hp, hq = rotate2d(u - F32(cu + 22 * s), v - F32(cv + 62 * s), g["heart_tilt"])
    heart = np.maximum(ellipsoid((hp, hq), (0, 0), (g["heart_a"], g["heart_b"])), v - F32(cv + 110 * s))
    out = {"body": body, "heart": heart}
    for name, side, dome in (
        ("right_lung", -1.0, g["dome_r"]),
        ("left_lung", 1.0, g["dome_r"] + g["dome_l"]),
    ):
        lc = cu + side * 68 * s
        lung = ellipsoid((u, v), (lc, cv - 8 * s), (58 * s, g["lung_h"]))
        diaphragm = v - F32(cv + dome) - ((u - F32(lc - side * 8 * s)) ** 2) / F32(170 * s)
        medial = F32(side) * (F32(cu + side * 20 * s) - u)
        knob = ellipsoid((u, v), (cu + 16 * s, cv - 58 * s), (16 * s, 16 * s))  # aortic knob
        lung = np.maximum(np.maximum(lung, diaphragm), np.maximum(medial, -knob))
        out[name] = np.maximum(lung, F32(2.0) - heart)
    for name, side in (("right_clavicle", -1.0), ("left_clavicle", 1.0)):
        t = F32(side) * (u - F32(cu))  # lateral distance from the midline
        tau = (t - F32(20 * s)) / F32(100 * s)
        centre = F32(cv - 106 * s) - F32(22 * s) * tau + F32(6 * s) * np.sin(F32(2 * np.pi) * tau)
        band = np.abs(v - centre) - F32(7.0 * s) * (F32(1.15) - F32(0.3) * tau)
        out[name] = np.maximum(band, np.maximum(F32(20 * s) - t, t - F32(120 * s)))
    return out


def _ribs(g: dict[str, float], pts: Coords) -> tuple[np.ndarray, np.ndarray]:
    """Occupancy of the posterior ribs (fill plus bright cortical edges) and of the anterior ribs."""
    v, u = pts
    s, cu, cv = g["s"], g["cu"], g["cv"]
    post = np.zeros(v.shape, F32)
    ant = np.zeros(v.shape, F32)
    t = np.abs(u - F32(cu))
    inside = soft(np.maximum(F32(14 * s) - t, t - F32(140 * s)), 3.0)
    pitch = g["rib_pitch"]
    for k in range(10):  # posterior ribs: up and out from the spine, then curving down laterally
        vk = cv - 122 * s + (k + g["rib_phase"]) * pitch
        centre = F32(vk - 9 * s) + F32(0.0045 / s) * (t - F32(45 * s)) ** 2
        d = np.abs(v - centre) - F32(5.5 * s)
        post = np.maximum(
            post, inside * (F32(0.6) * soft(d, 1.5) + F32(0.4) * soft(np.abs(d) - F32(0.8), 1.0))
        )
    lateral = soft(np.maximum(F32(50 * s) - t, t - F32(140 * s)), 4.0)
    for k in range(6):  # anterior ribs: from the lateral chest wall down towards the sternum, fading
        wk = cv - 100 * s + (k + 0.5 * g["rib_phase"]) * 1.6 * pitch
        centre = F32(wk) + F32(0.45) * (F32(140 * s) - t)
        ant = np.maximum(ant, lateral * soft(np.abs(v - centre) - F32(6 * s), 2.0))
    return post, ant


def _case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """16-bit image (size^2) and 0/255 masks ((size // 2)^2) of one radiograph."""
    g = _anatomy(rng)
    deform = Deformation.draw(rng, (5, 5), rng.uniform(4.0, 7.0))
    shape, half = (size, size), (size // 2, size // 2)
    sp = FOV_MM / size
    pts = deform.apply(grid(shape, (sp, sp)), shape)
    sd = _sdfs(g, pts)
    v, u = pts
    s, cu, cv = g["s"], g["cu"], g["cv"]

    body = soft(sd["body"], 2.0)
    t = (u - F32(cu)) / F32(150 * s)
    img = F32(0.05) + body * (F32(0.42) + F32(0.22) * np.sqrt(np.clip(1 - t * t, 0, 1)))
    img += F32(0.1) * body * soft(F32(cv + 95 * s) - v, 30.0)  # abdomen below the domes
    lungs = np.minimum(sd["right_lung"], sd["left_lung"])
    depth = np.clip(-lungs / F32(18.0), 0, 1) ** F32(0.7)
    base = np.clip((F32(cv + 90 * s) - v) / F32(70.0), 0.45, 1.0)  # soft tissue overlaps the lung bases
    markings = F32(0.05) * smooth_field(rng, shape, (28, 28))
    hila = sum(
        np.exp(-((u - F32(cu + side * 42 * s)) ** 2 + (v - F32(cv + 5 * s)) ** 2) / F32(2 * 32.0**2))
        for side in (-1, 1)
    )
    img -= soft(lungs, 1.5) * (F32(0.36) * depth * base - markings - F32(0.1) * hila)
    img += F32(0.14) * soft(sd["heart"], 2.0)
    mediastinum = soft(np.abs(u - F32(cu)) - F32(28 * s), 4.0) * soft(v - F32(cv + 60 * s), 20.0)
    img += F32(0.08) * mediastinum * body
    disc = F32(0.85) + F32(0.15) * np.cos(F32(2 * np.pi / 24.0) * (v - F32(cv)))
    img += F32(0.14) * soft(np.abs(u - F32(cu)) - F32(20 * s), 2.0) * disc * body  # spine
    trachea = soft(np.maximum(np.abs(u - F32(cu + 2)) - F32(8 * s), v - F32(cv - 60 * s)), 2.0)
    img -= F32(0.1) * trachea * body
    post, ant = _ribs(g, pts)
    img += body * (F32(0.13) * post + F32(0.06) * ant)
    img += F32(0.18) * np.maximum(soft(sd["right_clavicle"], 1.5), soft(sd["left_clavicle"], 1.5))
    for side in (-1, 1):
        img += F32(0.05) * soft(ellipsoid((u, v), (cu + side * 128 * s, cv - 80 * s), (30 * s, 70 * s)), 4.0)

    angle = rng.uniform(0, 2 * np.pi)  # exposure: smooth gradient across the film
    ramp = (F32(np.cos(angle)) * u + F32(np.sin(angle)) * v) / F32(FOV_MM / 2)
    img *= np.exp(F32(rng.uniform(0.08, 0.18)) * ramp + F32(0.06) * SmoothField.draw(rng, (4, 4)).at(shape))
    img = gaussian_noise(rng, blur(img, 1.0), rng.uniform(0.008, 0.015))
    lo, hi = np.percentile(img, (0.05, 99.95))
    image = np.rint(np.clip((img - lo) / (hi - lo), 0, 1) * 65535).astype(np.uint16)

    msd = _sdfs(g, deform.apply(grid(half, (2 * sp, 2 * sp)), half))
    masks = {k: np.where(msd[k] < 0, 255, 0).astype(np.uint8) for k in STRUCTURES}
    return image, masks


def generate(
    root: Path, seed: int = 0, progress: Progress | None = None, *, n_cases: int = 24, size: int = 512
) -> None:
    """Write ``images/SYNXRNNN.IMG.png`` (16-bit, ``size``^2) and ``masks/<structure>/SYNXRNNN.gif``
    (0/255, ``size // 2``^2) for ``n_cases`` radiographs under ``root``."""
    if size % 2:
        raise ValueError(f"size must be even (masks are half the image resolution), got {size}")
    for i in range(int(n_cases)):
        case = f"SYNXR{i + 1:03d}"
        image, masks = _case(case_rng(seed, i), int(size))
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{case}.IMG.png")
        for name, mask in masks.items():
            (root / "masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / name / f"{case}.gif", optimize=False)
        if progress is not None:
            progress(f"xray {i + 1}/{n_cases}: {case}")
