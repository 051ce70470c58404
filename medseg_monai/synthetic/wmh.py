"""Synthetic FLAIR + T1 heads with white-matter hyperintensities in the WMH 2017 layout.

Models an elderly head imaged with thick (3 mm) slices: scalp fat, skull, outer CSF, a folded cortex
with widened sulci, white matter, deep grey nuclei and ventricles under an elastic deformation, and
small-vessel-disease lesions (label 1): 1-3 confluent periventricular caps at the ventricular horns
(each over 1000 voxels) and a few hundred small punctate lesions, mostly periventricular, most under
10 voxels, each kept one voxel apart from every other so that lesion counts are the same with 6- and
26-connectivity.  1-3 infarct-like blobs (label 2, "other pathology": a dark cavity with a bright
gliotic rim on FLAIR) sit in the white matter or cortex.  Lesions are bright on FLAIR and dark on
T1; each image has its own bias field, Rician noise and partial volume, and two sites (``SiteA``,
``SiteB``) differ in contrast, noise and intensity scale.  It reproduces no real subject or scanner;
it only gives the WMH pipeline a learnable, non-trivial target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ._common import (
    F32,
    Brain,
    Coords,
    Progress,
    brain_anatomy,
    brain_layers,
    case_rng,
    ellipsoid,
    head_coords,
    jitter,
    lps_affine,
    mr_acquire,
    render,
    smooth_field,
    soft,
    write_nifti,
)

# relative intensities per tissue (before bias, noise and the per-case jitter)
# fmt: off
FLAIR = {"scalp": 0.8, "skull": 0.05, "outer_csf": 0.08, "gm": 0.6, "wm": 0.45, "deep_gm": 0.55, "csf": 0.08,
         "ventricles": 0.07, "lining": 0.72, "wmh": 0.88, "wmh_edge": 0.6, "cavity": 0.12, "gliosis": 0.85}
T1 = {"scalp": 0.95, "skull": 0.08, "outer_csf": 0.15, "gm": 0.55, "wm": 0.8, "deep_gm": 0.65, "csf": 0.15,
      "ventricles": 0.12, "lining": 0.7, "wmh": 0.55, "wmh_edge": 0.68, "cavity": 0.18, "gliosis": 0.5}
# fmt: on


@dataclass(frozen=True)
class Site:
    """What differs between the two acquisition sites (ranges are drawn per case)."""

    first_subject: int
    flair_contrast: float  # scales (lesion - white matter) and (grey - white matter) on FLAIR
    noise: tuple[float, float]
    bias: tuple[float, float]
    gain: tuple[float, float]  # float32 intensity scale


SITES = {
    "SiteA": Site(0, 1.0, (0.022, 0.032), (0.1, 0.18), (700.0, 900.0)),
    "SiteB": Site(100, 0.85, (0.035, 0.05), (0.15, 0.25), (250.0, 350.0)),
}


@dataclass(frozen=True)
class Phantom:
    """One case: images (float32), label map, and the brain and ventricle masks it was built from."""

    site: str
    subject: str
    flair: np.ndarray
    t1: np.ndarray
    label: np.ndarray
    brain: np.ndarray
    ventricles: np.ndarray


def subjects(n_cases: int) -> list[tuple[str, str]]:
    """(site, subject id) of every case: the first half at ``SiteA`` (0, 1, ...), the rest at ``SiteB``
    (100, 101, ...)."""
    n_a = math.ceil(n_cases / 2)
    return [("SiteA", str(SITES["SiteA"].first_subject + i)) for i in range(n_a)] + [
        ("SiteB", str(SITES["SiteB"].first_subject + i)) for i in range(n_cases - n_a)
    ]


def _infarcts(
    rng: np.random.Generator, pts: Coords, brain: Brain, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """SDFs of the cavity and of the whole infarct (cavity + gliotic rim) of 1-3 blobs away from the
    ventricles, in the cerebral white matter or cortex."""
    cavity = np.full(shape, np.inf, F32)
    whole = np.full(shape, np.inf, F32)
    field = smooth_field(rng, shape, (12, 12, 6))
    sites = np.flatnonzero((brain.brain < -6) & (brain.ventricles > 16) & (np.abs(pts[0]) > 10))
    for flat in rng.choice(sites, size=int(rng.integers(1, 4)), replace=False):
        centre = tuple(float(c.flat[flat]) for c in pts)
        r = rng.uniform(4.0, 8.0) * rng.uniform(0.8, 1.25, 3)
        blob = ellipsoid(pts, centre, r) + F32(1.0) * field
        whole = np.minimum(whole, blob)
        cavity = np.minimum(cavity, blob + F32(rng.uniform(1.8, 3.0)))
    inside = np.maximum(brain.brain + F32(1.0), F32(10.0) - brain.ventricles)
    return np.maximum(cavity, inside), np.maximum(whole, inside)


def _solid(mask: np.ndarray) -> np.ndarray:
    """``mask`` reduced to the largest 6-connected part of each of its 26-connected components, so that
    its components are the same with either connectivity."""
    comps, _ = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    parts, _ = ndimage.label(mask)
    keep = np.zeros(mask.shape, bool)
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
        sub = parts[box][comps[box] == k]
        best = np.bincount(sub).argmax()
        keep[box] |= parts[box] == best
    return keep


_STEPS = np.array([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)])


def _punctate(
    rng: np.random.Generator,
    allowed: np.ndarray,
    taken: np.ndarray,
    starts: np.ndarray,
    n: int,
    spacing: Sequence[float],
) -> list[np.ndarray]:
    """Grow ``n`` small lesions (voxel index arrays) from random ``starts`` (flat indices) inside
    ``allowed``: each is 6-connected (random growth) and one voxel away from all voxels already
    ``taken`` (updated in place, with a one-voxel margin) so that no two lesions touch, even diagonally."""
    w = np.array([1.0 / s for s in spacing for _ in (0, 1)])  # fewer steps across the thick slices
    w /= w.sum()
    shape = allowed.shape
    lesions = []
    for flat in rng.choice(starts, size=min(n * 3, starts.size), replace=False):
        if len(lesions) == n:
            break
        seed_vox = np.unravel_index(flat, shape)
        if taken[seed_vox]:
            continue
        size = int(np.clip(round(math.exp(rng.normal(1.0, 0.9))), 1, 150))
        vox = [tuple(int(c) for c in seed_vox)]
        members = set(vox)
        for _ in range(size * 6):
            if len(vox) == size:
                break
            base = vox[int(rng.integers(len(vox)))]
            nxt = tuple(int(c) for c in np.add(base, _STEPS[rng.choice(6, p=w)]))
            if nxt in members or not all(0 <= c < s for c, s in zip(nxt, shape, strict=True)):
                continue
            if allowed[nxt] and not taken[nxt]:
                vox.append(nxt)
                members.add(nxt)
        idx = np.array(vox)
        for i, j, k in idx:
            taken[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, max(k - 1, 0) : k + 2] = True
        lesions.append(idx)
    return lesions


def phantom(
    seed: int,
    index: int,
    n_cases: int = 12,
    shape: Sequence[int] = (160, 160, 40),
    spacing: Sequence[float] = (1.2, 1.2, 3.0),
) -> Phantom:
    """Case ``index`` of the dataset ``generate(root, seed, n_cases=n_cases, ...)`` writes, in memory."""
    rng = case_rng(seed, index)
    site_name, subject = subjects(n_cases)[index]
    site = SITES[site_name]
    shape3 = tuple(int(n) for n in shape)
    sp = tuple(float(s) for s in spacing)
    pts = head_coords(rng, shape3, sp, rng.uniform(2.0, 3.5), shift=(0.0, 0.0, -4.0))
    scale = rng.uniform(1.1, 1.5)  # enlarged ventricles and sulci (atrophy)
    brain = brain_anatomy(rng, pts, sp, ventricle_scale=scale, sulcal_width=rng.uniform(1.2, 2.2))
    right, ant, _ = pts
    vents = brain.ventricles

    cavity, infarct = _infarcts(rng, pts, brain, shape3)

    # confluent periventricular caps at 1-3 of the four horns (frontal and occipital, left and right): the
    # white matter nearest each horn (by a noisy distance), over 1100 voxels each, 1500-5000 in all
    budget = rng.uniform(1500, 5000)
    n_caps = int(rng.integers(1, min(3, int(budget // 1100)) + 1))
    reach = vents - F32(1.5) * smooth_field(rng, shape3, (12, 12, 6))
    tissue = np.maximum(
        np.maximum(brain.wm + F32(1.0), -vents), np.maximum(-brain.deep_gm, F32(3.0) - infarct)
    )
    caps = np.full(shape3, np.inf, F32)
    for k in rng.choice(4, size=n_caps, replace=False):
        s, a = (-1.0, 1.0)[k % 2], (-1.0, 1.0)[k // 2]  # side, and frontal (+1) or occipital (-1) horn
        horn = ellipsoid(pts, (s * 10 * scale, a * 28 * scale, 6), (18, 18, 16))
        bounds = np.maximum(np.maximum(horn, F32(2.0) - F32(s) * right), tissue)
        size = int(max(1100, budget / n_caps * rng.uniform(0.8, 1.2)))
        eligible = reach[bounds < 0]
        level = np.partition(eligible, size)[size] if eligible.size > size else np.inf
        caps = np.minimum(caps, np.maximum(reach - level, bounds))

    label = np.zeros(shape3, np.uint8)
    label[_solid(caps < 0)] = 1
    label[infarct < 0] = 2

    # punctate lesions: 60 % within 12 mm of the ventricles, the rest in the deep white matter
    allowed = (brain.wm < -0.5) & (vents > 1.0) & (brain.deep_gm > 1.0) & (infarct > 2.0)
    taken = ndimage.binary_dilation(label > 0, np.ones((3, 3, 3), bool))  # keep off caps and infarcts
    n_small = int(rng.integers(200, 330))
    near = allowed & (vents < 12.0)
    lesions = _punctate(rng, allowed, taken, np.flatnonzero(near), int(0.6 * n_small), sp)
    lesions += _punctate(rng, allowed, taken, np.flatnonzero(allowed & ~near), n_small - len(lesions), sp)
    punct = np.zeros(shape3, F32)
    for idx in lesions:
        punct[tuple(idx.T)] = 1.0
    label[punct > 0] = 1

    # images: head, brain, lesions (caps fade towards their edge), infarcts
    pv = 1.0
    head = [
        ("scalp", soft(brain.brain - F32(12.0) + F32(1.5) * smooth_field(rng, shape3, (5, 5, 3)), pv)),
        ("skull", soft(brain.brain - F32(8.0), pv)),
        ("outer_csf", soft(brain.brain - F32(3.0), pv)),
    ]
    fade = np.clip(-caps / F32(3.0), 0, 1)
    layers = [
        *head,
        *brain_layers(brain, pv),
        ("lining", soft(vents - F32(1.5), pv) - soft(vents, pv)),  # normal ependymal lining, not a lesion
        ("wmh", np.maximum(soft(caps, pv), punct)),
        ("gliosis", soft(infarct, pv)),
        ("cavity", soft(cavity, pv)),
    ]
    texture = smooth_field(rng, shape3, (40, 40, 12))
    cortex = smooth_field(rng, shape3, (16, 16, 8))  # regional grey-matter signal differences
    images = []
    for table, is_flair in ((FLAIR, True), (T1, False)):
        v: dict[str, float | np.ndarray] = dict(jitter(rng, table, 0.05))
        if is_flair:
            for k in ("gm", "lining", "wmh", "wmh_edge", "gliosis"):
                v[k] = v["wm"] + site.flair_contrast * (v[k] - v["wm"])
        lesion = v["wmh_edge"] + (v["wmh"] - v["wmh_edge"]) * np.maximum(fade, punct)
        v["wmh"] = lesion * (1 + F32(0.1) * texture)
        v["gm"] = v["gm"] * (1 + F32(0.1 if is_flair else 0.04) * cortex)
        img = render(shape3, layers, v)
        img = mr_acquire(rng, img, (0.5, 0.5, 0.3), rng.uniform(*site.bias), rng.uniform(*site.noise))
        images.append((img * F32(rng.uniform(*site.gain))).astype(np.float32))
    return Phantom(site_name, subject, images[0], images[1], label, brain.brain < 0, vents < 0)


def generate(
    root: Path,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    n_cases: int = 12,
    shape: Sequence[int] = (160, 160, 40),
    spacing: Sequence[float] = (1.2, 1.2, 3.0),
) -> None:
    """Write ``{site}/{subject}/pre/FLAIR.nii.gz``, ``pre/T1.nii.gz`` (float32) and ``wmh.nii.gz``
    (uint8: 0 background, 1 WMH, 2 other pathology) under ``root`` (see :func:`subjects`)."""
    affine = lps_affine(spacing, shape)
    for i in range(int(n_cases)):
        p = phantom(seed, i, int(n_cases), shape, spacing)
        case = root / p.site / p.subject
        write_nifti(case / "pre" / "FLAIR.nii.gz", p.flair, affine)
        write_nifti(case / "pre" / "T1.nii.gz", p.t1, affine)
        write_nifti(case / "wmh.nii.gz", p.label, affine)
        if progress is not None:
            progress(f"wmh {i + 1}/{n_cases}: {p.site}/{p.subject}")
