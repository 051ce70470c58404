"""Synthetic phantoms: determinism, the on-disk layouts the registry reads, class frequencies, the WMH
lesion statistics, and that no global intensity threshold segments the main structure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medseg_monai.data import find_cases, get_dataset
from medseg_monai.synthetic import GENERATORS, default_params, generate, wmh

REGISTRY = Path(__file__).resolve().parents[1] / "datasets.json"
STUDIES = ("knee", "brats", "wmh", "lv", "xray")
# a few cases each, at the default resolution (lv: 2 patients = 4 cases; wmh: 2 at SiteA, 1 at SiteB)
SMALL = {
    "knee": {"n_cases": 3},
    "brats": {"n_cases": 3},
    "wmh": {"n_cases": 3},
    "lv": {"n_patients": 2},
    "xray": {"n_cases": 3},
}
# per study: (expected case count, spacing, image shape) at the SMALL parameters
LAYOUT = {
    "knee": (3, (0.7, 0.7, 3.0), (160, 160, 36)),
    "brats": (3, (2.0, 2.0, 2.0), (96, 96, 64)),
    "wmh": (3, (1.2, 1.2, 3.0), (160, 160, 40)),
    "lv": (4, (1.5, 1.5, 8.0), None),  # 10-15 slices per patient
    "xray": (3, None, (512, 512)),
}
LABELS = {"knee": {0, 1, 2, 3}, "brats": {0, 1, 2, 4}, "wmh": {0, 1, 2}, "lv": {0, 1, 2, 3}}
MAIN = {"knee": "femur", "brats": "whole tumour", "wmh": "wmh", "lv": "lv_cavity", "xray": "lungs"}


def _generator_block(study: str) -> dict[str, Any]:
    entry = next(d for d in json.loads(REGISTRY.read_text())["datasets"] if d["id"] == f"{study}-synthetic")
    return entry["generator"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each study's phantoms, seed 0, generated once for the module."""
    roots = {}
    for study in STUDIES:
        roots[study] = tmp_path_factory.mktemp(f"synthetic-{study}")
        generate(study, roots[study], seed=0, params=SMALL[study])
    return roots


def _cases(study: str, root: Path) -> list[dict[str, Any]]:
    return find_cases(get_dataset(f"{study}-synthetic"), root)


def _read(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _xray_masks(item: dict[str, Any]) -> dict[str, np.ndarray]:
    return {Path(p).parent.name: np.array(Image.open(p)) > 0 for p in item["label"]}


def _class_mask(study: str, item: dict[str, Any], name: str) -> np.ndarray:
    """Boolean map of ``name`` in one case: a registry class (the union of its structures) or a structure."""
    spec = get_dataset(f"{study}-synthetic")
    sets = [spec.class_set(s) for s in spec.labels["classes"]]
    structures = next((cs[name] for cs in sets if name in cs), [name])
    if study == "xray":
        masks = _xray_masks(item)
        return np.any([masks[s] for s in structures], axis=0)
    values = [v for v, s in spec.structures.items() if s in structures]
    return np.isin(_read(item["label"]), values)


def best_threshold_dice(image: np.ndarray, target: np.ndarray, n: int = 256) -> float:
    """Best Dice of ``image >= t`` or ``image < t`` against ``target`` over ``n`` quantile thresholds t:
    sorted values and searchsorted count the voxels on each side of every threshold at once."""
    values = np.asarray(image, np.float64).ravel()
    fg = np.sort(values[np.asarray(target, bool).ravel()])
    thresholds = np.unique(np.quantile(values, np.linspace(0, 1, n)))
    above = values.size - np.searchsorted(np.sort(values), thresholds)
    fg_above = fg.size - np.searchsorted(fg, thresholds)
    dice_above = 2 * fg_above / (above + fg.size)
    dice_below = 2 * (fg.size - fg_above) / (values.size - above + fg.size)
    return float(max(dice_above.max(), dice_below.max()))


def _arrays(study: str, root: Path) -> list[np.ndarray]:
    """Every image and label array of a dataset, in case order."""
    out = []
    for item in _cases(study, root):
        for p in [*item["image"], *([item["label"]] if isinstance(item["label"], str) else item["label"])]:
            out.append(np.array(Image.open(p)) if p.endswith((".png", ".gif")) else _read(p))
    return out


# --- determinism ------------------------------------------------------------------------------------


@pytest.mark.parametrize("study", STUDIES)
def test_deterministic_per_seed(study: str, datasets: dict[str, Path], tmp_path: Path) -> None:
    one = {k: 1 for k in SMALL[study]}  # the first case (lv: patient) alone is the same as in a larger set
    generate(study, tmp_path / "again", seed=0, params=one)
    generate(study, tmp_path / "other", seed=1, params=one)
    first = _arrays(study, datasets[study])
    again, other = _arrays(study, tmp_path / "again"), _arrays(study, tmp_path / "other")
    assert len(again) == len(other) > 0
    assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=False))
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(other, first, strict=False))


def test_generators_registered_with_defaults() -> None:
    assert set(STUDIES) <= set(GENERATORS)
    for study in STUDIES:
        # the registry keeps each generator's defaults, but X-ray's: 120 small images, so that the
        # grid's training-set size sweep (up to 105 images) sweeps
        expected = {"n_cases": 120, "size": 256} if study == "xray" else {}
        assert _generator_block(study)["params"] == expected
        assert set(SMALL[study]) <= set(default_params(study))
    assert default_params("brats")["shape"] == [96, 96, 64] and default_params("lv")["n_patients"] == 10
    assert default_params("wmh")["shape"] == [160, 160, 40] and default_params("wmh")["n_cases"] == 12


# --- layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("study", ["knee", "brats", "wmh", "lv"])
def test_nifti_layout(study: str, datasets: dict[str, Path]) -> None:
    n, spacing, shape = LAYOUT[study]
    items = _cases(study, datasets[study])
    assert len(items) == n
    seen: set[int] = set()
    for item in items:
        label = nib.load(item["label"])
        lab = np.asarray(label.dataobj)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= LABELS[study], item["case_id"]
        seen |= set(np.unique(lab).tolist())
        assert np.allclose(label.header.get_zooms(), spacing), item["case_id"]
        for path in item["image"]:
            img = nib.load(path)
            assert img.shape == lab.shape and np.allclose(img.affine, label.affine)
            assert img.get_data_dtype() == (np.float32 if study == "wmh" else np.int16)
        if shape is not None:
            assert lab.shape == shape
    assert seen == LABELS[study]
    if study == "wmh":
        assert all(set(np.unique(_read(it["label"]))) == {0, 1, 2} for it in items)
        sites = {it["case_id"].split("_")[0] for it in items}
        assert sites == {"SiteA", "SiteB"} and {it["case_id"] for it in items} >= {"SiteA_0", "SiteB_100"}


def test_brats_layout_details(datasets: dict[str, Path]) -> None:
    items = _cases("brats", datasets["brats"])
    assert [it["case_id"] for it in items] == [f"Brats18_SYN_{i:03d}_1" for i in (1, 2, 3)]
    assert nib.aff2axcodes(nib.load(items[0]["flair"]).affine) == ("L", "P", "S")
    flair, seg = _read(items[0]["flair"]), _read(items[0]["label"])
    assert (flair[seg > 0] > 0).all() and flair.min() == 0  # skull-stripped: zero outside the brain


def test_lv_layout_details(datasets: dict[str, Path]) -> None:
    items = _cases("lv", datasets["lv"])
    assert [it["group"] for it in items] == ["patient001"] * 2 + ["patient002"] * 2
    for ed, es in (items[0:2], items[2:4]):
        assert ed["case_id"].endswith("_frame01") and 8 <= int(es["case_id"][-2:]) <= 15
        a, b = _read(ed["label"]), _read(es["label"])
        assert a.shape == b.shape and 10 <= a.shape[2] <= 15 and a.shape[:2] == (128, 128)
        assert (b == 3).sum() < (a == 3).sum() and (b == 2).sum() > 0.8 * (a == 2).sum()  # ES: smaller cavity
        per_slice = (a == 3).sum(axis=(0, 1))  # from the base, shrinking, gone beyond the apex
        assert per_slice[0] > 0 and per_slice[-1] == 0 and per_slice[1] > per_slice[-2]


def test_xray_layout(datasets: dict[str, Path]) -> None:
    items = _cases("xray", datasets["xray"])
    assert len(items) == LAYOUT["xray"][0]
    for item in items:
        image = Image.open(item["image"][0])
        assert image.mode == "I;16" and image.size == (512, 512)
        for path in item["label"]:
            mask = np.array(Image.open(path))
            assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}, path
        left = _xray_masks(item)["left_lung"]
        assert np.argwhere(left)[:, 1].mean() > left.shape[1] / 2  # the patient's left: the image's right


# --- class frequencies ------------------------------------------------------------------------------


@pytest.mark.parametrize("study", STUDIES)
def test_class_fractions_in_registry_ranges(study: str, datasets: dict[str, Path]) -> None:
    expected = _generator_block(study)["expected_fractions"]
    items = _cases(study, datasets[study])
    for name, (lo, hi) in expected.items():
        frac = float(np.mean([_class_mask(study, it, name).mean() for it in items]))
        assert lo <= frac <= hi, (name, frac)


# --- WMH lesions ------------------------------------------------------------------------------------


def test_wmh_lesion_statistics(datasets: dict[str, Path]) -> None:
    item = _cases("wmh", datasets["wmh"])[0]
    label = _read(item["label"])
    phantom = wmh.phantom(0, 0, n_cases=SMALL["wmh"]["n_cases"])  # the same case, with its ventricles
    assert np.array_equal(phantom.label, label)
    lesions = label == 1
    comps, n = ndimage.label(lesions, ndimage.generate_binary_structure(3, 3))  # 26-connectivity
    assert ndimage.label(lesions)[1] == n  # tiny lesions never touch, even diagonally
    sizes = np.bincount(comps.ravel())[1:]
    assert n >= 100 and np.mean(sizes < 10) > 0.5 and sizes.max() > 1000, (n, sorted(sizes)[-5:])
    assert 0.002 <= lesions.sum() / phantom.brain.sum() <= 0.03
    # periventricular: within 10 mm of the ventricles
    dist = ndimage.distance_transform_edt(~phantom.ventricles, sampling=(1.2, 1.2, 3.0))
    assert np.mean(dist[lesions] <= 10.0) > 0.5
    assert 1 <= ndimage.label(label == 2, ndimage.generate_binary_structure(3, 3))[1] <= 3


# --- no threshold segments the main structure ---------------------------------------------------------


def test_threshold_helper() -> None:
    img = np.arange(100.0)
    assert best_threshold_dice(img, img >= 50) == pytest.approx(1.0)
    assert best_threshold_dice(img, img < 30) == pytest.approx(1.0)
    assert best_threshold_dice(np.zeros(100), np.arange(100) < 50) == pytest.approx(2 / 3)


@pytest.mark.parametrize("study", STUDIES)
def test_no_global_threshold_segments_the_main_class(study: str, datasets: dict[str, Path]) -> None:
    for item in _cases(study, datasets[study]):
        if study == "xray":
            image = np.array(Image.open(item["image"][0]))
            masks = _xray_masks(item)
            target = np.kron(masks["left_lung"] | masks["right_lung"], np.ones((2, 2), bool))
            keep = np.ones(image.shape, bool)
        else:
            image = _read(item["image"][0])  # knee MR, brats/wmh FLAIR, lv cine
            label = _read(item["label"])
            target = label > 0 if study == "brats" else _class_mask(study, item, MAIN[study])
            keep = label != 2 if study == "wmh" else np.ones(label.shape, bool)  # other pathology ignored
        dice = best_threshold_dice(image[keep], target[keep])
        assert dice < 0.7, (study, item["case_id"], dice)
