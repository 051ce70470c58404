"""Synthetic coronal knee MR with femur, tibia and fibula labels (layout of ``knee-mr-bones``).

Models an adolescent knee imaged with 36 thick coronal slices: elastically deformed femur (shaft,
metaphysis, two condyles, intercondylar notch), tibia (plateau, eminence, tuberosity, shaft) and
fibula (head and shaft, lateral, below the joint), dark cortical rims, dark growth plates across femur
and tibia near the joint (part of the bone labels), articular cartilage, an unlabelled patella with
its tendon, muscle, subcutaneous/intermuscular/popliteal/Hoffa fat as bright as marrow, a bias field,
Rician noise and partial volume along the 3 mm axis.  It reproduces no real anatomy or scanner; it
only gives the knee pipeline a learnable, non-trivial target.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._common import (
    F32,
    Deformation,
    Progress,
    bias_field,
    blur,
    case_rng,
    centred_origin,
    ellipsoid,
    grid,
    make_affine,
    paint,
    rician_noise,
    smooth_field,
    smooth_union,
    soft,
    spacing_for,
    to_int16,
    write_nifti,
)

FOV_MM = (112.0, 112.0, 108.0)  # left-right, inferior-superior, anterior-posterior (coronal slices)
# array axis 0 -> +x (left-right), axis 1 -> +z (superior), axis 2 -> -y (posterior): a RAS-style affine
DIRECTIONS = ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0))

FAT, MARROW_EPI, MARROW_META, MUSCLE = 0.86, 0.84, 0.72, 0.34
CORTEX, PHYSIS, CARTILAGE, TENDON = 0.06, 0.28, 0.52, 0.05


def _case(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, ...]):
    """Image (float, ~[0, 1]) and label map of one knee."""
    x0, s0, p0 = grid(shape, spacing)
    x, s, a = Deformation.draw(rng, (4, 4, 3), rng.uniform(2.0, 3.5)).apply((x0, s0, -p0), shape)
    pts = (x, s, a)
    side = float(rng.choice([-1.0, 1.0]))  # lateral direction: right or left knee
    sc = rng.uniform(0.9, 1.06)
    gap = rng.uniform(4.0, 6.0)
    joint = rng.uniform(-8.0, 4.0)
    fem0, tib0 = joint + gap / 2, joint - gap / 2  # femoral and tibial joint surfaces

    # femur: two condyles, metaphyseal flare, shaft; posterior intercondylar notch removed
    cond_l = ellipsoid(pts, (side * 17 * sc, fem0 + 13 * sc, -3), (14.5 * sc, 13 * sc, 26 * sc))
    cond_m = ellipsoid(pts, (-side * 16 * sc, fem0 + 13.5 * sc, -3), (15.5 * sc, 13.5 * sc, 27 * sc))
    meta = ellipsoid(pts, (0, fem0 + 27 * sc, -2), (27 * sc, 20 * sc, 23 * sc))
    shaft = np.maximum(ellipsoid((x, a), (0, -1), (13 * sc, 13 * sc)), F32(fem0 + 32 * sc) - s)
    femur = smooth_union(smooth_union(smooth_union(cond_l, cond_m, 4.0), meta, 7.0), shaft, 9.0)
    notch = ellipsoid(pts, (0, fem0 + 2, -17 * sc), (6.5 * sc, 11 * sc, 18 * sc))
    femur = np.maximum(femur, -notch)

    # tibia: flat plateau with concave compartments and central eminence, tuberosity, shaft
    top = (
        F32(tib0)
        - F32(1.2) * np.exp(-((np.abs(x) - F32(16 * sc)) ** 2) / F32(60))
        + F32(3.5) * np.exp(-(x**2) / F32(18) - (a + 2) ** 2 / F32(80))
    )
    plateau = np.maximum(ellipsoid(pts, (0, tib0 - 10 * sc, -3), (34 * sc, 24 * sc, 25 * sc)), s - top)
    meta_t = ellipsoid(pts, (-side * 2, tib0 - 32 * sc, -1), (22 * sc, 22 * sc, 20 * sc))
    shaft_t = np.maximum(ellipsoid((x, a), (-side * 3, -1), (12.5 * sc, 12 * sc)), s - F32(tib0 - 35 * sc))
    tuber = ellipsoid(pts, (0, tib0 - 26 * sc, 18 * sc), (9 * sc, 12 * sc, 8 * sc))
    tibia = smooth_union(smooth_union(smooth_union(plateau, meta_t, 6.0), shaft_t, 8.0), tuber, 4.0)

    # fibula: head below the lateral tibial plateau, thin shaft
    fx, fa = side * 35 * sc, -14 * sc
    head = ellipsoid(pts, (fx, tib0 - 20 * sc, fa), (8 * sc, 10 * sc, 8 * sc))
    shaft_f = np.maximum(
        ellipsoid((x, a), (fx + side * 1.5, fa + 1.5), (5 * sc, 5 * sc)), s - F32(tib0 - 24 * sc)
    )
    fibula = smooth_union(head, shaft_f, 4.0)

    patella = ellipsoid(pts, (0, fem0 + 22 * sc, 34 * sc), (20 * sc, 19 * sc, 8 * sc))
    tendon = ellipsoid(pts, (0, (fem0 + 6 + tib0 - 24) / 2, 28 * sc), (10, (fem0 - tib0 + 30) / 2, 2.5))
    cruciate = ellipsoid(pts, (0, joint, -8), (4.5, 10, 8))

    # soft tissues: limb cross-section, subcutaneous fat, muscle with fat streaks, fat pads
    limb = ellipsoid((x, a), (0, -2), (49 + rng.uniform(-2, 3), 50 + rng.uniform(-2, 2)))
    fat_t = F32(7.0) + F32(2.5) * smooth_field(rng, shape, (4, 4, 3))
    streak = F32(1.25) - smooth_field(rng, shape, (9, 9, 6))
    img = np.zeros(shape, F32)
    paint(img, soft(limb, 1.0), FAT)
    inner = soft(limb + fat_t, 1.0)
    paint(img, inner, MUSCLE * (1 + F32(0.06) * smooth_field(rng, shape, (12, 12, 8))))
    paint(img, soft(streak * F32(3.0), 1.0) * inner, FAT)
    paint(img, soft(ellipsoid(pts, (0, joint + 4, -34), (22, 32, 14)), 2.0), FAT)  # popliteal fat
    paint(img, soft(ellipsoid(pts, (0, joint - 3, 27 * sc), (15, 10, 9)), 2.0), FAT)  # Hoffa fat pad
    paint(img, soft(tendon, 1.0), TENDON)
    paint(img, soft(cruciate, 1.5), TENDON * 3)

    # cartilage (label 0) on the joint surfaces, then bones: cortex, marrow, growth plates
    paint(img, soft(femur - F32(2.2), 1.0) * soft(s - F32(fem0 + 14), 3.0), CARTILAGE)
    paint(img, soft(tibia - F32(2.0), 1.0) * soft(F32(tib0 - 4) - s, 3.0), CARTILAGE)
    paint(img, soft(patella - F32(2.5), 1.0) * soft(F32(30 * sc) - a, 2.0), CARTILAGE)
    texture = F32(0.05) * smooth_field(rng, shape, (28, 28, 12))
    wave = smooth_field(rng, (shape[0], 1, shape[2]), (7, 1, 5))
    phys_f = F32(fem0 + 17 * sc) + F32(3.0) * wave
    phys_t = F32(tib0 - 15 * sc) - F32(2.5) * wave
    for bone, plate, up in ((femur, phys_f, 1), (tibia, phys_t, -1), (fibula, None, 0), (patella, None, 0)):
        cortex = rng.uniform(1.4, 2.2)
        paint(img, soft(bone, 0.9), CORTEX)
        if plate is None:
            marrow = MARROW_EPI + texture
        else:  # red-ish marrow in the metaphysis, fatty marrow in the epiphysis
            meta_side = soft(F32(up) * (plate - s), 2.0)
            marrow = MARROW_EPI + (MARROW_META - MARROW_EPI) * meta_side + texture
        paint(img, soft(bone + F32(cortex), 0.9), marrow)
        if plate is not None:
            paint(img, soft(np.abs(s - plate) - F32(0.9), 0.8) * soft(bone + F32(cortex), 0.9), PHYSIS)

    img = blur(img, (0.35, 0.35, 0.45))  # in-plane PSF and 3 mm slice profile
    img *= bias_field(rng, shape, rng.uniform(0.15, 0.3), (3, 3, 3))
    img = rician_noise(rng, img, rng.uniform(0.03, 0.05))

    sdfs = np.stack([femur, tibia, fibula])
    label = (np.argmin(sdfs, axis=0) + 1).astype(np.uint8)
    label[sdfs.min(axis=0) >= 0] = 0
    return img, label


def generate(
    root: Path,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    n_cases: int = 12,
    shape: Sequence[int] = (160, 160, 36),
) -> None:
    """Write ``imagesTr/knee_NNN.nii.gz`` (int16 MR) and ``labelsTr/knee_NNN.nii.gz`` (0 bg, 1 femur,
    2 tibia, 3 fibula) under ``root``; the field of view is fixed, ``shape`` sets the resolution."""
    shape3 = tuple(int(n) for n in shape)
    spacing = spacing_for(FOV_MM, shape3)
    affine = centred_origin(make_affine(spacing, DIRECTIONS), shape3)
    for i in range(int(n_cases)):
        case = f"knee_{i:03d}"
        img, label = _case(case_rng(seed, i), shape3, spacing)
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", to_int16(img, 1000.0), affine)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine)
        if progress is not None:
            progress(f"knee {i + 1}/{n_cases}: {case}")
