"""Synthetic pre-operative glioma MR in the BraTS 2018 layout (FLAIR, T1, T1ce, T2 and a label map).

Models a skull-stripped adult brain (cortex with folding, white matter, deep grey nuclei, sulcal CSF,
ventricles, choroid plexus) with an elastic deformation, and one glioma per case in a random
hemisphere that pushes the surrounding anatomy aside: a necrotic core (label 1) inside an enhancing
rim (label 4) inside peritumoural edema (label 2) that follows the white matter and spares the cortex,
all with lobulated, deformed boundaries.  Contrasts follow the usual MR appearance: edema bright on
FLAIR and T2 and fading towards its edge; the rim bright on T1ce; necrosis dark on T1/T1ce, bright on
T2 and intermediate on FLAIR; CSF bright on T2, dark on FLAIR; periventricular caps mildly bright on
FLAIR.  Every modality has its own bias field and Rician noise, and partial volume blurs the edges,
so no FLAIR threshold isolates the tumour.  It reproduces no real anatomy, tumour or scanner; it only
gives the BraTS pipeline a learnable, non-trivial target.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._common import (
    F32,
    Coords,
    Deformation,
    Progress,
    brain_anatomy,
    brain_layers,
    case_rng,
    ctrl_points,
    ellipsoid,
    head_coords,
    jitter,
    lps_affine,
    mr_acquire,
    render,
    smooth_field,
    soft,
    to_int16,
    write_nifti,
)

MODALITIES = ("flair", "t1", "t1ce", "t2")
# relative intensities per tissue and modality (before bias, noise and the per-case jitter)
CONTRAST: dict[str, dict[str, float]] = {
    "flair": {"gm": 0.58, "wm": 0.42, "deep_gm": 0.52, "csf": 0.08, "ventricles": 0.07, "caps": 0.66,
              "choroid": 0.3, "edema": 0.68, "edema_edge": 0.5, "enhancing": 0.58, "necrosis": 0.38},
    "t1": {"gm": 0.55, "wm": 0.78, "deep_gm": 0.64, "csf": 0.15, "ventricles": 0.14, "caps": 0.7,
           "choroid": 0.45, "edema": 0.47, "edema_edge": 0.66, "enhancing": 0.5, "necrosis": 0.22},
    "t1ce": {"gm": 0.52, "wm": 0.72, "deep_gm": 0.6, "csf": 0.15, "ventricles": 0.14, "caps": 0.65,
             "choroid": 0.85, "edema": 0.45, "edema_edge": 0.6, "enhancing": 0.97, "necrosis": 0.2},
    "t2": {"gm": 0.5, "wm": 0.32, "deep_gm": 0.42, "csf": 1.0, "ventricles": 1.0, "caps": 0.5,
           "choroid": 0.5, "edema": 0.8, "edema_edge": 0.45, "enhancing": 0.62, "necrosis": 0.9},
}  # fmt: skip
SCALE = {"flair": (250, 500), "t1": (300, 700), "t1ce": (150, 900), "t2": (600, 1600)}  # int16 gain ranges


def _mass_effect(pts: Coords, centre: Sequence[float], push: float, reach: float) -> Coords:
    """Coordinates at which the anatomy is sampled so that it appears pushed away from ``centre``:
    r -> r * (1 - push * exp(-(r / reach)^2)), monotonic for push < 1 (no folding)."""
    d = [p - F32(c) for p, c in zip(pts, centre, strict=True)]
    r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    f = F32(1.0) - F32(push) * np.exp(-r2 / F32(reach * reach))
    return tuple(F32(c) + di * f for di, c in zip(d, centre, strict=True))


def _case(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The four modalities (float, ~[0, 1]) and the BraTS label map of one case."""
    pts = head_coords(rng, shape, spacing, rng.uniform(2.0, 4.0))
    right, ant, _ = pts
    side = float(rng.choice([-1.0, 1.0]))
    centre = (side * rng.uniform(20, 36), rng.uniform(-32, 34), rng.uniform(2, 28))
    r_core = rng.uniform(11.0, 18.0)
    brain = brain_anatomy(rng, _mass_effect(pts, centre, rng.uniform(0.15, 0.35), r_core + 15), spacing)

    # tumour compartments, lobulated by their own deformation and boundary fields
    t = Deformation.draw(rng, (8, 8, 6), rng.uniform(3.0, 5.0)).apply(pts, shape)
    aniso = rng.uniform(0.8, 1.25, 3)
    fine, lobes = ctrl_points(shape, spacing, 14.0), ctrl_points(shape, spacing, 8.0)
    core = ellipsoid(t, centre, r_core * aniso) + F32(0.2 * r_core) * smooth_field(rng, shape, lobes)
    hemisphere = F32(1.0) - F32(side) * right  # the tumour stays on its side of the midline
    core = np.maximum(np.maximum(core, brain.brain + F32(1.0)), hemisphere)
    r_nec = r_core * rng.uniform(0.6, 0.85)
    nec = ellipsoid(t, centre, r_nec * aniso * rng.uniform(0.85, 1.15, 3))
    nec = nec + F32(0.15 * r_nec) * smooth_field(rng, shape, lobes)
    nec = np.maximum(nec, core + F32(rng.uniform(2.5, 4.0)))
    # edema: a margin of varying reach around the core (finger-like), in the white matter only
    spread = np.maximum(F32(1.0) + F32(0.6) * smooth_field(rng, shape, fine), F32(0.2))
    reach = F32(rng.uniform(5.0, 14.0)) * spread
    edema = np.maximum(core - reach, brain.wm + F32(0.5))
    edema = np.maximum(np.minimum(edema, core - F32(2.0)), np.maximum(brain.brain + F32(1.0), hemisphere))

    label = np.zeros(shape, np.uint8)
    label[edema < 0] = 2
    label[core < 0] = 4
    label[nec < 0] = 1

    # normal bright-FLAIR periventricular caps at the horns, choroid plexus in the atria
    horns = np.clip((np.abs(ant) - F32(12.0)) / F32(8.0), 0, 1)
    caps_t = F32(rng.uniform(3.0, 6.0)) + F32(1.5) * smooth_field(rng, shape, fine)
    caps = (soft(brain.ventricles - caps_t, 2.0) - soft(brain.ventricles, 1.0)) * horns
    choroid = np.maximum(
        *(soft(ellipsoid(pts, (s * 14, -26, 4), (2.5, 5.0, 3.0)), 1.5) for s in (-1.0, 1.0))
    ) * soft(brain.ventricles, 1.0)
    pv = 1.0
    layers = [
        *brain_layers(brain, pv),
        ("caps", caps),
        ("choroid", choroid),
        ("edema", soft(edema, pv)),
        ("enhancing", soft(core, pv)),
        ("necrosis", soft(nec, pv)),
    ]
    # edema fades towards its edge; enhancement and necrosis are heterogeneous
    depth = np.clip(-edema / F32(rng.uniform(3.0, 6.0)), 0, 1)
    hetero = smooth_field(rng, shape, ctrl_points(shape, spacing, 6.0))  # ~6 mm blotches: no net brightening
    cortex = smooth_field(rng, shape, fine)  # regional grey-matter signal differences
    mask = soft(brain.brain, pv) > 0
    images = {}
    for mod in MODALITIES:
        v: dict[str, float | np.ndarray] = dict(jitter(rng, CONTRAST[mod], 0.06))
        v["edema"] = (v["edema_edge"] + (v["edema"] - v["edema_edge"]) * depth) * (1 + F32(0.15) * hetero)
        v["enhancing"] = v["enhancing"] * (1 + F32(0.08) * hetero)
        v["gm"] = v["gm"] * (1 + F32(0.12 if mod == "flair" else 0.05) * cortex)
        v["necrosis"] = v["necrosis"] * (1 + F32(0.2) * hetero)
        bias = rng.uniform(0.12, 0.2) if mod == "flair" else rng.uniform(0.08, 0.18)
        img = mr_acquire(rng, render(shape, layers, v), 0.5, bias, rng.uniform(0.025, 0.04))
        images[mod] = to_int16(np.where(mask, img, 0), rng.uniform(*SCALE[mod]))
    return images, label


def generate(
    root: Path,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    n_cases: int = 12,
    shape: Sequence[int] = (96, 96, 64),
    spacing: float = 2.0,
) -> None:
    """Write ``Brats18_SYN_NNN_1/Brats18_SYN_NNN_1_{flair,t1,t1ce,t2,seg}.nii.gz`` under ``root``:
    int16 images and a uint8 label map (0 background, 1 necrotic/non-enhancing core, 2 edema,
    4 enhancing), LPS, ``spacing`` mm isotropic."""
    shape3 = tuple(int(n) for n in shape)
    spacing3 = (float(spacing),) * 3
    affine = lps_affine(spacing3, shape3)
    for i in range(int(n_cases)):
        case = f"Brats18_SYN_{i + 1:03d}_1"
        images, label = _case(case_rng(seed, i), shape3, spacing3)
        for mod, img in images.items():
            write_nifti(root / case / f"{case}_{mod}.nii.gz", img, affine)
        write_nifti(root / case / f"{case}_seg.nii.gz", label, affine)
        if progress is not None:
            progress(f"brats {i + 1}/{n_cases}: {case}")
