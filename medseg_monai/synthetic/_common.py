"""Building blocks shared by the synthetic phantom generators.

Shapes are signed distance functions (SDFs, in mm, negative inside) evaluated on voxel-centre
coordinates.  Elastic deformation warps those coordinates (equivalent to warping the shape maps,
but the label map and the partial-volume image stay exactly consistent), soft shapes give partial
volume, and the image formation adds smooth bias fields and Gaussian or Rician noise.

Nothing here reproduces a real scanner or population: the phantoms only exercise the pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

Coords = tuple[np.ndarray, ...]
Progress = Callable[[str], None]
F32 = np.float32


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Random generator of one case: it depends only on (seed, index), so every case is reproducible alone."""
    return np.random.default_rng([int(seed), int(index)])


def spacing_for(fov_mm: Sequence[float], shape: Sequence[int]) -> tuple[float, ...]:
    """Voxel spacing (mm) that keeps a fixed field of view whatever the requested shape."""
    return tuple(float(f) / int(n) for f, n in zip(fov_mm, shape, strict=True))


def grid(shape: Sequence[int], spacing: Sequence[float]) -> Coords:
    """Open (broadcastable) grid of voxel-centre coordinates in mm, centred on the volume centre."""
    ndim = len(shape)
    out = []
    for axis, (n, sp) in enumerate(zip(shape, spacing, strict=True)):
        c = ((np.arange(n, dtype=F32) - (n - 1) / 2.0) * F32(sp)).astype(F32)
        view = [1] * ndim
        view[axis] = n
        out.append(c.reshape(view))
    return tuple(out)


def _weights(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) Gaussian interpolation weights, rows L2-normalised (unit variance output)."""
    pos = (np.arange(n_out) + 0.5) / n_out
    ctrl = np.linspace(0.0, 1.0, n_ctrl) if n_ctrl > 1 else np.array([0.5])
    width = 1.0 / max(n_ctrl - 1, 1)
    w = np.exp(-0.5 * ((pos[:, None] - ctrl[None, :]) / width) ** 2)
    return w / np.sqrt((w**2).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class SmoothField:
    """Random smooth field: i.i.d. normal control values on a coarse grid, Gaussian-interpolated.

    The output has zero mean and unit variance at every point; the correlation length is about
    1/(ctrl - 1) of the extent.  Evaluation is separable (one small matrix product per axis), and
    the same field can be evaluated at any resolution covering the same extent (``at``).
    """

    coarse: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, ctrl: Sequence[int]) -> SmoothField:
        return cls(rng.standard_normal(tuple(int(c) for c in ctrl)))

    def at(self, shape: Sequence[int]) -> np.ndarray:
        # one axis at a time, the last first, so that only the final product (axis 0) is full-size; einsum
        # rather than BLAS: a multi-threaded BLAS call costs a scheduler tick when the CPUs are busy
        out = self.coarse
        for axis in reversed(range(out.ndim)):
            n, c = int(shape[axis]), out.shape[axis]
            lead, trail = out.shape[:axis], out.shape[axis + 1 :]
            block = out.reshape(int(np.prod(lead)), c, int(np.prod(trail)))
            out = np.einsum("nc,lct->lnt", _weights(n, c), block).reshape(*lead, n, *trail)
        return out.astype(F32)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], ctrl: Sequence[int]) -> np.ndarray:
    """Zero-mean unit-variance smooth random field of ``shape`` (see :class:`SmoothField`)."""
    return SmoothField.draw(rng, ctrl).at(shape)


@dataclass(frozen=True)
class Deformation:
    """Smooth random displacement (mm or coordinate units) applied to coordinate grids."""

    fields: tuple[SmoothField, ...]
    amplitude: float

    @classmethod
    def draw(cls, rng: np.random.Generator, ctrl: Sequence[int], amplitude: float) -> Deformation:
        return cls(tuple(SmoothField.draw(rng, ctrl) for _ in ctrl), float(amplitude))

    def apply(self, coords: Coords, shape: Sequence[int]) -> Coords:
        """Deformed coordinates (full arrays): shapes evaluated on them are elastically deformed."""
        return tuple(
            (c + F32(self.amplitude) * f.at(shape)).astype(F32)
            for c, f in zip(coords, self.fields, strict=True)
        )


def bias_field(
    rng: np.random.Generator, shape: Sequence[int], strength: float, ctrl: Sequence[int]
) -> np.ndarray:
    """Multiplicative smooth bias field exp(strength * smooth field)."""
    return np.exp(F32(strength) * smooth_field(rng, shape, ctrl))


def rician_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (Rician statistics, as in MR magnitude images)."""
    re = img + F32(sigma) * rng.standard_normal(img.shape, dtype=F32)
    im = F32(sigma) * rng.standard_normal(img.shape, dtype=F32)
    return np.sqrt(re * re + im * im)


def gaussian_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Additive white Gaussian noise."""
    return img + F32(sigma) * rng.standard_normal(img.shape, dtype=F32)


def blur(img: np.ndarray, sigma_vox: float | Sequence[float]) -> np.ndarray:
    """Gaussian blur in voxels: point-spread function / slice profile (partial volume across voxels)."""
    return ndimage.gaussian_filter(img, sigma_vox, mode="nearest", truncate=2.5)


# --- signed distance functions (mm, negative inside) -------------------------------------------------


def ellipsoid(coords: Coords, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Approximate SDF of an axis-aligned ellipsoid (any dimension; fewer coords give a cylinder)."""
    k0 = 0.0
    k1 = 0.0
    for c, c0, r in zip(coords, centre, radii, strict=True):
        q = (c - F32(c0)) / F32(r)
        k0 = k0 + q * q
        k1 = k1 + (q / F32(r)) ** 2
    k0 = np.sqrt(k0)
    eps = F32(1e-6)
    return (k0 - 1) * (k0 + eps) / (np.sqrt(k1) + eps / F32(min(radii)))


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two SDFs (blends the shapes over about k mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / F32(k), 0, 1)
    return b + (a - b) * h - F32(k) * h * (1 - h)


def rotate2d(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates rotated by ``angle`` radians."""
    c, s = F32(np.cos(angle)), F32(np.sin(angle))
    return c * u + s * v, -s * u + c * v


def soft(sdf: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy of a shape: 1 inside, 0 outside, linear ramp of ``width`` mm (0.5 on the edge)."""
    return np.clip(F32(0.5) - sdf / F32(width), 0, 1)


def paint(img: np.ndarray, frac: np.ndarray, value: float | np.ndarray) -> None:
    """Composite a tissue of intensity ``value`` with occupancy ``frac`` over ``img`` (in place)."""
    img += frac * (value - img)


# --- output --------------------------------------------------------------------------------------------


def make_affine(
    spacing: Sequence[float], directions: Sequence[Sequence[float]], origin: Sequence[float] | None = None
) -> np.ndarray:
    """4x4 voxel-to-world affine; ``directions[i]`` is the unit world direction of array axis i."""
    aff = np.eye(4)
    for i, (sp, d) in enumerate(zip(spacing, directions, strict=True)):
        aff[:3, i] = np.asarray(d, dtype=float) * sp
    aff[:3, 3] = 0.0 if origin is None else np.asarray(origin, dtype=float)
    return aff


def centred_origin(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Copy of ``affine`` translated so that the volume centre sits at world (0, 0, 0)."""
    aff = affine.copy()
    centre = (np.asarray(shape, dtype=float) - 1) / 2
    aff[:3, 3] = -aff[:3, :3] @ centre
    return aff


def to_int16(img: np.ndarray, scale: float) -> np.ndarray:
    """Scale, round and clip to int16."""
    return np.clip(np.rint(img * F32(scale)), 0, np.iinfo(np.int16).max).astype(np.int16)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI-1 volume (gzip is deterministic in nibabel, so equal arrays give equal files)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))


# --- brain anatomy shared by the brain phantoms ----------------------------------------------------------


@dataclass(frozen=True)
class Brain:
    """SDFs (mm) of a generic adult brain, plus the occupancy of the extra-ventricular CSF."""

    brain: np.ndarray
    wm: np.ndarray
    deep_gm: np.ndarray
    ventricles: np.ndarray
    csf: np.ndarray


def brain_anatomy(
    rng: np.random.Generator,
    coords: Coords,
    spacing: Sequence[float],
    ventricle_scale: float = 1.0,
    pv: float = 1.0,
    sulcal_width: float = 1.0,
) -> Brain:
    """Cerebrum + cerebellum + brainstem, folded cortex, sulcal/surface CSF, midline fissure, lateral and
    third ventricles and deep grey nuclei; ``coords`` = (left-right, posterior-anterior, inferior-superior).
    ``sulcal_width`` (mm) widens the sulci (atrophy).
    """
    x, y, z = coords
    shape = x.shape
    size = rng.uniform(0.92, 1.05)
    cerebrum = ellipsoid(coords, (0, 0, 6), (64 * size, 80 * size, 52 * size))
    cerebellum = ellipsoid(coords, (0, -46 * size, -34 * size), (44 * size, 24 * size, 17 * size))
    stem = ellipsoid(coords, (0, -16 * size, -44 * size), (11, 11, 26))
    brain = smooth_union(smooth_union(cerebrum, cerebellum, 6.0), stem, 5.0)

    # cortical folding: sulci are sheets along the zero set of a random field (gyri ~10 mm wide) that
    # reach 10-25 mm deep; the grey matter is a ~3 mm ribbon along the brain surface and the sulci
    ctrl = [max(3, round(n * sp / 6.0) + 1) for n, sp in zip(shape, spacing, strict=True)]
    fold = smooth_field(rng, shape, ctrl)
    slope = np.sqrt(sum(g * g for g in np.gradient(fold, *[float(s) for s in spacing])))
    depth = -brain
    reach = F32(17.0) + F32(5.0) * smooth_field(rng, shape, [max(2, c // 4) for c in ctrl])
    sulcus = np.maximum(np.abs(fold) / np.maximum(slope, F32(0.04)), depth - reach)  # mm to the sheet
    thickness = F32(rng.uniform(3.2, 3.8))
    wm = thickness - np.minimum(depth, sulcus)
    sulci = soft(sulcus - F32(0.5 * sulcal_width), pv) * soft(brain, pv)
    surface = soft(brain, pv) - soft(brain + F32(1.2), pv)
    mid = np.abs(x - F32(rng.normal(0, 1.5))) - F32(1.2)
    above = np.maximum(soft(F32(12.0) - z, 4.0), soft(F32(45.0) - np.abs(y), 4.0))
    fissure = soft(mid, pv) * above * soft(-brain - F32(30.0), 4.0)
    csf = np.maximum(np.maximum(sulci, surface), fissure)

    vs = ventricle_scale * size
    vents = None
    for side in (-1.0, 1.0):
        body = ellipsoid(coords, (side * 7 * vs, -2 * vs, 10), (4.5 * vs, 24 * vs, 6 * vs))
        frontal = ellipsoid(coords, (side * 9 * vs, 22 * vs, 5), (5 * vs, 9 * vs, 8 * vs))
        atrium = ellipsoid(coords, (side * 14 * vs, -26 * vs, 4), (6 * vs, 9 * vs, 9 * vs))
        lateral = smooth_union(smooth_union(body, frontal, 4.0), atrium, 4.0)
        vents = lateral if vents is None else np.minimum(vents, lateral)
    third = ellipsoid(coords, (0, 0, -4), (1.8, 12 * vs, 8))
    vents = smooth_union(vents, third, 2.0)
    deep = np.minimum(
        ellipsoid(coords, (-15 * vs, 4, -2), (9, 16, 10)), ellipsoid(coords, (15 * vs, 4, -2), (9, 16, 10))
    )
    return Brain(brain=brain, wm=wm, deep_gm=deep, ventricles=vents, csf=csf)


# --- MR image formation and brain phantoms (brats, wmh) ---------------------------------------------------

Layers = list[tuple[str, np.ndarray]]  # (tissue name, occupancy in [0, 1]) in painting order

# array axes -> world left, posterior, superior (nibabel's RAS affine reads 'L', 'P', 'S'), as BraTS
LPS = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0))


def lps_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """LPS-ordered voxel-to-world affine with the volume centre at world (0, 0, 0)."""
    return centred_origin(make_affine(spacing, LPS), shape)


def head_coords(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: Sequence[float],
    amplitude: float,
    ctrl: Sequence[int] = (5, 5, 4),
    shift: Sequence[float] = (0.0, 0.0, 0.0),
) -> Coords:
    """Elastically deformed (right, anterior, superior) coordinates (mm) of an LPS-ordered volume, as
    :func:`brain_anatomy` takes them; ``shift`` moves the head's origin (mm) in that frame."""
    left, post, sup = grid(shape, spacing)
    pts = (-left - F32(shift[0]), -post - F32(shift[1]), sup - F32(shift[2]))
    return Deformation.draw(rng, ctrl, amplitude).apply(pts, shape)


def brain_layers(brain: Brain, pv: float) -> Layers:
    """Tissue occupancies of :class:`Brain` in painting order: cortex (grey matter over the whole brain),
    white matter, deep grey nuclei, sulcal/surface CSF, ventricles."""
    return [
        ("gm", soft(brain.brain, pv)),
        ("wm", soft(brain.wm, pv)),
        ("deep_gm", soft(brain.deep_gm, 2.0 * pv)),
        ("csf", brain.csf),
        ("ventricles", soft(brain.ventricles, pv)),
    ]


def render(shape: Sequence[int], layers: Layers, values: dict[str, float | np.ndarray]) -> np.ndarray:
    """Paint ``layers`` in order, each with its tissue's intensity in ``values`` (one modality's contrast);
    tissues missing from ``values`` keep what lies below them."""
    img = np.zeros(tuple(shape), F32)
    for name, occ in layers:
        if name in values:
            paint(img, occ, values[name])
    return img


def mr_acquire(
    rng: np.random.Generator,
    img: np.ndarray,
    psf: float | Sequence[float],
    bias: float,
    noise: float,
    bias_ctrl: Sequence[int] = (3, 3, 3),
    gain: np.ndarray | None = None,
) -> np.ndarray:
    """Image formation of one MR acquisition: point-spread blur (voxels), a receive-coil ``gain`` profile
    (optional), its own multiplicative bias field exp(``bias`` * smooth field), then Rician noise."""
    out = blur(img, psf) * bias_field(rng, img.shape, bias, bias_ctrl)
    if gain is not None:
        out *= gain
    return rician_noise(rng, out, noise)


def ctrl_points(
    shape: Sequence[int], spacing: Sequence[float], length: float, minimum: int = 4
) -> tuple[int, ...]:
    """Control grid of a :class:`SmoothField` whose features are about ``length`` mm across."""
    return tuple(max(minimum, round(n * sp / length)) for n, sp in zip(shape, spacing, strict=True))


def jitter(rng: np.random.Generator, table: dict[str, float], rel: float) -> dict[str, float]:
    """A contrast table with every intensity scaled by its own factor in [1 - rel, 1 + rel]."""
    return {k: float(v) * float(rng.uniform(1 - rel, 1 + rel)) for k, v in table.items()}
