"""Synthetic cine short-axis cardiac MR (end-diastole and end-systole) in the ACDC layout.

Models a stack of 10-15 thick short-axis slices from the base of the ventricles to below the apex in a
bSSFP-like contrast: a truncated-ellipsoid left ventricle (bright blood pool with darker papillary
muscles and trabeculae, all labelled cavity) inside a dark-grey myocardial wall that narrows to the
apex and vanishes in the last slice(s), a right-ventricular crescent of bright blood wrapped around
the septum with a thin unlabelled free wall, patchy bright epicardial fat, dark lungs, mediastinal
tissue, the descending aorta (bright blood), the spine, the anterior chest wall (muscle, subcutaneous
fat) and the liver below the apex.  End-systole shares the patient's anatomy with a smaller cavity,
a thicker wall and a shorter ventricle.  An elastic deformation, a receive-coil profile brighter
towards one side, a bias field, Rician noise and partial volume across the 8 mm slices complete it.
It reproduces no real heart or scanner; it only gives the cardiac pipeline a learnable, non-trivial
target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    F32,
    Coords,
    Deformation,
    Layers,
    Progress,
    case_rng,
    centred_origin,
    ellipsoid,
    grid,
    jitter,
    make_affine,
    mr_acquire,
    render,
    rotate2d,
    smooth_field,
    smooth_union,
    soft,
    to_int16,
    write_nifti,
)

# bSSFP-like relative intensities (before coil profile, bias, noise and the per-case jitter)
CONTRAST = {"body": 0.36, "fat": 0.82, "muscle": 0.3, "lung": 0.05, "liver": 0.34, "spine": 0.55,
            "blood": 0.86, "myocardium": 0.27, "papillary": 0.32}  # fmt: skip
SUBSLICES = (-2.7, 0.0, 2.7)  # mm: the slice profile, sampled (partial volume across the thick slices)
DIRECTIONS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


@dataclass(frozen=True)
class Heart:
    """Cardiac phase of one patient (mm): LV cavity semi-axes and length, wall thickness, RV extent."""

    a: float  # LV cavity semi-axis towards the RV (septal direction)
    b: float  # LV cavity semi-axis across
    length: float  # cavity length from the base plane to the endocardial apex
    wall: float  # myocardial thickness (apical cap a little thinner)
    rv_radial: float  # RV cavity reach beyond the septum
    papillary: float  # papillary muscle radius


def _frame(
    rng: np.random.Generator,
    pts: Coords,
    heart: Heart,
    anatomy: dict[str, Any],
    background: Layers,
) -> tuple[Layers, np.ndarray]:
    """Tissue layers and label map (at every sub-slice sample) of one cardiac phase; the lungs fill the
    space the heart leaves."""
    u, v, z = pts
    p, q = rotate2d(u - F32(anatomy["u0"]), v - F32(anatomy["v0"]), anatomy["angle"])  # p: towards the RV
    zb = anatomy["base"]
    below_base = z - F32(zb)  # the ventricles start at the base (valve) plane
    h = heart
    endo = np.maximum(ellipsoid((p, q, z), (0, 0, zb), (h.a, h.b, h.length)), -below_base)
    epi = np.maximum(
        ellipsoid((p, q, z), (0, 0, zb), (h.a + h.wall, h.b + h.wall, h.length + 0.8 * h.wall)), -below_base
    )
    rv_len = anatomy["rv_length"] * h.length
    rv_centre = (h.a + h.wall - 0.35 * h.rv_radial, 0, zb)
    rv_out = ellipsoid((p, q, z), rv_centre, (h.rv_radial * 1.35, 1.25 * (h.b + h.wall), rv_len))
    rv_out = np.maximum(rv_out, -below_base)
    rv = np.maximum(rv_out + F32(2.5), -epi)  # the cavity, inside a 2.5 mm free wall, outside the septum
    heart_out = smooth_union(epi, rv_out, 4.0)

    # papillary muscles and trabeculae (labelled cavity), mid-ventricle, near the lateral wall
    pap = np.full(p.shape, np.inf, F32)
    for ang in anatomy["papillary_angles"]:
        centre = (0.62 * h.a * np.cos(ang), 0.62 * h.b * np.sin(ang), zb + 0.5 * h.length)
        pap = np.minimum(pap, ellipsoid((p, q, z), centre, (h.papillary, h.papillary, 0.35 * h.length)))
    near_wall = np.clip(-endo - F32(4.0), 0, None)
    trab = F32(1.2) - smooth_field(rng, p.shape, (16, 16, 4)) + near_wall

    fat = heart_out - F32(anatomy["fat"]) * np.maximum(anatomy["fat_field"], F32(0.0))
    lungs = np.maximum(anatomy["lungs"], F32(2.0) - fat)
    layers = [
        *background,
        ("lung", soft(lungs, 2.0)),
        ("fat", soft(fat, 1.5)),
        ("myocardium", soft(heart_out, 1.0)),
        ("blood", soft(rv, 1.0)),
        ("myocardium", soft(epi, 1.0)),
        ("blood", soft(endo, 1.0)),
        ("papillary", soft(np.maximum(pap, endo), 1.0)),
        ("papillary", soft(np.maximum(trab, endo), 1.0) * F32(0.7)),
    ]
    label = np.zeros(p.shape, np.uint8)
    label[rv < 0] = 1
    label[epi < 0] = 2
    label[endo < 0] = 3
    return layers, label


def _patient(
    rng: np.random.Generator, size: int, n_slices: int, spacing: Sequence[float]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """ED and ES images (float) and label maps of one patient."""
    n_sub = len(SUBSLICES)
    shape = (size, size, n_slices * n_sub)
    u, v, _ = grid((size, size, n_slices), spacing)
    z = np.arange(n_slices, dtype=F32)[:, None] * F32(spacing[2]) + np.array(SUBSLICES, F32)
    z = z.reshape(1, 1, -1)  # slice centres (mm from the first slice) and their profile samples
    pts = Deformation.draw(rng, (5, 5, 3), rng.uniform(2.0, 4.0)).apply((u, v, z), shape)
    uu, vv, _ = pts

    # patient anatomy: heart position and orientation, extent along the stack, surrounding tissues
    a = rng.uniform(21.0, 28.0)
    apex = spacing[2] * (n_slices - 1) - rng.uniform(4.0, 13.0)  # the last slice(s) lie beyond the apex
    anatomy = {
        "u0": rng.uniform(-8, 8) + 8.0,
        "v0": rng.uniform(-8, 8),
        "angle": np.pi + 0.3 + rng.uniform(-0.35, 0.35),  # the RV towards -u (image left), anterior
        "base": -rng.uniform(1.0, 6.0),
        "rv_length": rng.uniform(0.7, 0.85),
        "fat": rng.uniform(4.0, 9.0),
        "papillary_angles": (np.pi - rng.uniform(0.6, 1.1), np.pi + rng.uniform(0.6, 1.1)),  # lateral wall
    }
    anatomy["fat_field"] = F32(0.3) + smooth_field(rng, shape, (6, 6, 4))
    ed = Heart(
        a=a,
        b=a * rng.uniform(0.9, 1.1),
        length=apex - anatomy["base"] - 8.0,
        wall=rng.uniform(7.0, 10.0),
        rv_radial=rng.uniform(13.0, 19.0),
        papillary=rng.uniform(2.5, 3.5),
    )
    f = rng.uniform(0.6, 0.75)
    es = replace(
        ed,
        a=ed.a * f,
        b=ed.b * f,
        length=ed.length * rng.uniform(0.88, 0.95),
        wall=ed.wall * rng.uniform(1.3, 1.6),
        rv_radial=ed.rv_radial * rng.uniform(0.65, 0.8),
        papillary=ed.papillary * 1.3,
    )

    # chest: anterior wall (skin, subcutaneous fat, muscle), lungs, spine, descending aorta, liver
    skin = F32(rng.uniform(-92, -78)) + F32(4.0) * smooth_field(rng, shape, (4, 4, 2))
    subcut = skin + F32(rng.uniform(8.0, 16.0))
    u0 = anatomy["u0"]
    lung_l = ellipsoid(pts, (u0 + rng.uniform(45, 55), rng.uniform(5, 20), 40), (45, 75, 140))
    lung_r = ellipsoid(pts, (u0 - rng.uniform(65, 75), rng.uniform(0, 15), 30), (42, 75, 140))
    aorta_c = (rng.uniform(5, 20), rng.uniform(50, 62))
    aorta = ellipsoid((uu, vv), aorta_c, (11.0, 11.0))
    spine = ellipsoid((uu, vv), (aorta_c[0] - 25, 85), (18.0, 16.0))
    liver = ellipsoid(pts, (-45, 10, apex + rng.uniform(15, 30)), (80, 70, 45))
    anatomy["lungs"] = np.maximum(np.minimum(lung_l, lung_r), -liver)  # the diaphragm below them
    background = [
        ("body", soft(skin - vv, 1.5)),  # mediastinum and chest wall
        ("fat", soft(skin - vv, 1.5) * soft(vv - subcut, 2.0)),
        ("muscle", soft(subcut - vv, 2.0) * soft(vv - subcut - F32(12.0), 2.0)),
        ("liver", soft(liver, 2.0)),
        ("spine", soft(spine, 1.5)),
        ("blood", soft(aorta, 1.0)),
    ]

    coil = -np.pi / 2 + rng.uniform(-0.6, 0.6)  # receive coil on the anterior chest, brighter towards it
    texture = smooth_field(rng, shape, (12, 12, 6))
    gain = np.exp(F32(rng.uniform(0.4, 0.8) / 96.0) * (F32(np.cos(coil)) * u + F32(np.sin(coil)) * v))
    images, labels = [], []
    for heart in (ed, es):
        layers, label = _frame(rng, pts, heart, anatomy, background)
        values: dict[str, float | np.ndarray] = dict(jitter(rng, CONTRAST, 0.05))
        values["body"] = values["body"] * (1 + F32(0.08) * texture)
        values["blood"] = values["blood"] * (1 + F32(0.06) * smooth_field(rng, shape, (8, 8, 4)))
        img = render(shape, layers, values).reshape(size, size, n_slices, n_sub).mean(axis=3)
        bias, noise = rng.uniform(0.1, 0.2), rng.uniform(0.025, 0.04)
        images.append(mr_acquire(rng, img, (0.6, 0.6, 0.0), bias, noise, gain=gain))
        labels.append(label[:, :, n_sub // 2 :: n_sub])
    return images, labels


def generate(
    root: Path,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    n_patients: int = 10,
    size: int = 128,
    spacing: Sequence[float] = (1.5, 1.5, 8.0),
) -> None:
    """Write ``patientNNN/patientNNN_frameFF.nii.gz`` (int16) and ``..._frameFF_gt.nii.gz`` (uint8: 0
    background, 1 RV cavity, 2 myocardium, 3 LV cavity) for end-diastole (frame 01) and end-systole
    (frame 08-15) of ``n_patients`` patients; each stack has 10-15 slices of ``size``^2 pixels."""
    sp = tuple(float(s) for s in spacing)
    for i in range(int(n_patients)):
        rng = case_rng(seed, i)
        patient = f"patient{i + 1:03d}"
        n_slices = int(rng.integers(10, 16))
        es_frame = int(rng.integers(8, 16))
        images, labels = _patient(rng, int(size), n_slices, sp)
        affine = centred_origin(make_affine(sp, DIRECTIONS), (size, size, n_slices))
        scale = rng.uniform(300.0, 800.0)
        for frame, img, label in zip((1, es_frame), images, labels, strict=True):
            stem = root / patient / f"{patient}_frame{frame:02d}"
            write_nifti(stem.with_name(stem.name + ".nii.gz"), to_int16(img, scale), affine)
            write_nifti(stem.with_name(stem.name + "_gt.nii.gz"), label, affine)
        if progress is not None:
            progress(f"lv {i + 1}/{n_patients}: {patient}")
