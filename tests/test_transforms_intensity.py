"""Intensity transforms: background to zero, a simulated narrow stored grey range, the X-ray poster's noise (sigma 5000
on the 16-bit scale whatever the stored depth, a fixed subset of cases per seed) and N4 bias-field
correction through SimpleITK."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, PILReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from medseg_monai.transforms import (
    BackgroundToZerod,
    CaseGaussianNoised,
    N4BiasFieldCorrectiond,
    RandStoredRanged,
    ScaleByBitDepthd,
    n4_bias_field,
)


def test_background_to_zero_shifts_each_channel_by_its_own_minimum() -> None:
    """A volume z-scored before release (background about -3.6, the BRATS 2015 four-class files)
    gets its background back to 0; a raw one (background 0) is unchanged; metadata stays."""
    scored = torch.full((1, 2, 2, 2), -3.6)
    scored[0, 0, 0, 0] = 1.4
    raw = torch.zeros(1, 2, 2, 2)
    raw[0, 1, 1, 1] = 250.0
    image = MetaTensor(torch.cat([scored, raw]), meta={"filename_or_obj": "brats_flair.nii.gz"})
    out = BackgroundToZerod("image")({"image": image})["image"]
    assert (
        torch.allclose(out[0].sum(), torch.tensor(5.0))
        and out[0].min() == 0
        and out[0, 0, 0, 0] == pytest.approx(5.0)
    )
    assert torch.equal(out[1].as_tensor(), raw[0])
    assert out.meta["filename_or_obj"] == "brats_flair.nii.gz"


def test_rand_stored_range_maps_into_a_drawn_part_of_the_grey_levels() -> None:
    image = torch.linspace(0, 1, 256).reshape(1, 16, 16)
    t = RandStoredRanged(keys="image", prob=1.0, min_width=15 / 255, levels=256)
    t.set_random_state(seed=3)
    out = t({"image": image})["image"]
    o, w = t.offset, t.width
    assert 15 / 255 <= w <= 1 and 0 <= o <= 1 - w
    assert torch.allclose(out, torch.round((o + w * image) * 255) / 255)
    # posterised: at most one stored level per 1/255 of the drawn range
    assert len(torch.unique(out)) <= round(w * 255) + 1
    assert out.min() >= o - 0.5 / 255 and out.max() <= o + w + 0.5 / 255
    unchanged = RandStoredRanged(keys="image", prob=0.0)({"image": image})["image"]
    assert torch.equal(unchanged, image)
    with pytest.raises(ValueError, match="min_width must be in"):
        RandStoredRanged(keys="image", min_width=0.0)


@pytest.mark.parametrize(("mode", "value", "dtype"), [("L", 128, np.uint8), ("I;16", 32768, np.uint16)])
def test_noise_sigma_is_on_the_16bit_scale(tmp_path: Path, mode: str, value: int, dtype: type) -> None:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((256, 256), value, dtype=dtype)).save(path)
    assert Image.open(path).mode == mode
    load = Compose([LoadImaged("image", reader=PILReader(), image_only=True), EnsureChannelFirstd("image")])
    clean = ScaleByBitDepthd("image")(load({"image": str(path), "case_id": "a"}))
    noisy = CaseGaussianNoised("image", std=5000 / 65535, fraction=1.0, seed=0)(clean)
    sigma = float(((noisy["image"] - clean["image"]) * 65535).std())
    assert sigma == pytest.approx(5000, rel=0.03)
    assert noisy["noisy"] == 1


def test_noise_subset_is_fixed_per_case_and_seed() -> None:
    noise = CaseGaussianNoised("image", std=0.1, fraction=0.5, seed=3)
    items = [{"image": torch.full((1, 4, 4), 0.5), "case_id": f"c{i}"} for i in range(200)]
    first = [noise(it) for it in items]
    again = [noise(it) for it in reversed(items)][::-1]
    assert 70 < sum(o["noisy"] for o in first) < 130
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))
    other_seed = [CaseGaussianNoised("image", std=0.1, fraction=0.5, seed=4)(it)["noisy"] for it in items]
    assert other_seed != [o["noisy"] for o in first]


def test_n4_removes_a_known_smooth_bias(tmp_path) -> None:
    """A piecewise-constant phantom times a smooth field: N4 flattens the field inside tissue, the
    corrected tissue's coefficient of variation falls, and the cache serves the second call."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (64, 64, 24)), indexing="ij")
    tissue = (x**2 + y**2 < 0.7) & (np.abs(z) < 0.9)
    phantom = np.where(tissue, 100.0, 0.0) + np.where(tissue & (x > 0.3), 40.0, 0.0)
    bias = np.exp(0.35 * x + 0.25 * y)  # 0.55 .. 1.8
    image = (phantom * bias).astype(np.float32)
    field = n4_bias_field(image, (1.0, 1.0, 3.0), shrink_factor=2, iterations=(50, 50, 50))
    region = tissue & (x <= 0.3)

    def cv(a: np.ndarray) -> float:
        return float(a[region].std() / a[region].mean())

    corrected = image / field
    assert cv(image) > 0.15 and cv(corrected) < cv(image) / 3, (cv(image), cv(corrected))
    transform = N4BiasFieldCorrectiond("image", shrink_factor=2, iterations=(50, 50, 50), cache_dir=tmp_path)

    item = {
        "image": MetaTensor(
            torch.from_numpy(image)[None], affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
        )
    }
    first = transform(item)["image"]
    assert list(tmp_path.glob("*.npy")) and np.allclose(first[0].numpy(), corrected, rtol=1e-3, atol=1e-3)
    second = transform(item)["image"]
    assert torch.equal(first, second) and isinstance(second, MetaTensor)
    with pytest.raises(ValueError, match="positive iterations"):
        N4BiasFieldCorrectiond("image", iterations=[])
