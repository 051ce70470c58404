"""Label-convention transforms on hand-made tensors and on the real JSRT/SCR and BraTS files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, PILReader
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClasses,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
)

from medseg_monai.data import DatasetError, get_dataset, load_datalist
from medseg_monai.io import apply_palette
from medseg_monai.transforms import (
    Argmaxd,
    CheckFilesd,
    InPlaneGridd,
    LabelToRegionsd,
    LoadMasksd,
    MasksToLabeld,
    RandStoredRanged,
    RemapLabelsd,
    ResizeToMatchd,
)


def test_argmax_matches_torch_argmax_ties_included_and_keeps_metadata() -> None:
    torch.manual_seed(0)
    probs = torch.randn(4, 9, 7, 5)
    probs[:, 0, 0, 0] = torch.tensor([0.2, 0.7, 0.7, 0.1])  # a tie: the first maximum wins, as in argmax
    probs[:, 1, 0, 0] = 0.5  # all equal: class 0
    image = MetaTensor(
        probs, affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])), meta={"filename_or_obj": "case"}
    )
    out = Argmaxd(keys="pred")({"pred": image})["pred"]
    assert out.shape == (1, 9, 7, 5) and out.dtype == torch.float32
    assert torch.equal(out.as_tensor(), torch.argmax(probs, 0, keepdim=True).float())
    assert out[0, 0, 0, 0] == 1 and out[0, 1, 0, 0] == 0
    assert torch.equal(out.affine, image.affine) and out.meta["filename_or_obj"] == "case"


def test_remap_brats_values_to_classes() -> None:
    label = torch.tensor([[[0, 1], [2, 4]]], dtype=torch.float32)
    out = RemapLabelsd("label", get_dataset("brats2018").label_mapping())({"label": label})["label"]
    assert out.tolist() == [[[0, 1], [2, 3]]]
    assert out.dtype == torch.float32


def test_remap_ignores_wmh_other_pathology_and_flags_it() -> None:
    spec = get_dataset("wmh2017")
    label = MetaTensor(torch.tensor([[[0, 1, 2], [2, 1, 0]]]), meta={"filename_or_obj": "wmh.nii.gz"})
    out = RemapLabelsd("label", spec.label_mapping(), spec.ignore_values(), ignore_key="ignore")(
        {"label": label}
    )
    assert out["label"].tolist() == [[[0, 1, 0], [0, 1, 0]]]
    assert out["ignore"].tolist() == [[[0, 0, 1], [1, 0, 0]]]
    assert out["label"].meta["filename_or_obj"] == "wmh.nii.gz"
    skip = RemapLabelsd("label", spec.label_mapping(), spec.ignore_values(), ignore_index=-1)(
        {"label": label}
    )
    assert skip["label"].tolist() == [[[0, 1, -1], [-1, 1, 0]]]


def test_remap_rejects_unknown_values_naming_the_file() -> None:
    label = MetaTensor(torch.tensor([[[0, 3]]]), meta={"filename_or_obj": "/data/case_seg.nii.gz"})
    with pytest.raises(DatasetError, match=r"/data/case_seg.nii.gz: unexpected label values \[3\]"):
        RemapLabelsd("label", {0: 0, 1: 1, 2: 2, 4: 3})({"label": label})


def test_masks_to_label_paints_classes_in_order() -> None:
    masks = torch.zeros(3, 2, 4)
    masks[0, :, 0:2] = 255  # right lung
    masks[1, :, 2:4] = 255  # left lung
    masks[2, 0, 1:3] = 255  # heart, overlapping both lungs
    out = MasksToLabeld("label", [[0, 1], [2]])({"label": masks})["label"]
    assert out.shape == (1, 2, 4)
    assert out[0].tolist() == [[1, 2, 2, 1], [1, 1, 1, 1]]


def test_resize_to_match_and_aspect_check() -> None:
    data = {"image": torch.zeros(1, 8, 6), "label": torch.zeros(1, 4, 3)}
    data["label"][0, 1, 1] = 1
    out = ResizeToMatchd("label", "image")(data)["label"]
    assert out.shape == (1, 8, 6) and set(out.unique().tolist()) == {0.0, 1.0} and out.sum() == 4
    bad = {
        "image": torch.zeros(1, 8, 6),
        "label": MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "m.gif"}),
    }
    with pytest.raises(
        DatasetError, match=r"m.gif: size \(4, 4\) does not have the aspect ratio of its image"
    ):
        ResizeToMatchd("label", "image")(bad)


def test_regions_generalise_monai_brats_conversion() -> None:
    label = torch.tensor([[[0, 1, 2], [3, 4, 4]]], dtype=torch.float32)
    regions = get_dataset("brats2018").regions()
    out = LabelToRegionsd("label", regions)({"label": label})["label"]
    assert out.shape == (3, 2, 3)
    assert out[0].tolist() == [[0, 1, 1], [0, 1, 1]]  # wt = 1, 2, 4
    monai_tc_wt_et = ConvertToMultiChannelBasedOnBratsClasses()(label)
    np.testing.assert_array_equal(out[[1, 0, 2]].numpy(), np.asarray(monai_tc_wt_et, dtype=np.float32)[:, 0])
    core_2015 = LabelToRegionsd("label", get_dataset("brats2015-4class").regions())({"label": label})[
        "label"
    ][1]
    assert core_2015.tolist() == [[0, 1, 0], [1, 1, 1]]  # 2015 value 3 (non-enhancing) is core


def _jsrt_pipeline(class_set: str = "default") -> Compose:
    spec = get_dataset("jsrt-scr")
    return Compose(
        [
            LoadImaged("image", reader=PILReader(converter=apply_palette), image_only=True),
            EnsureChannelFirstd("image"),
            LoadMasksd("label", reader="PILReader"),
            MasksToLabeld("label", spec.mask_classes(class_set)),
            ResizeToMatchd("label", "image"),
        ]
    )


def test_jsrt_scr_label_map_polarity_and_sides(shared_data: Path) -> None:
    items = load_datalist("jsrt-scr", data_root=shared_data / "jsrt-scr", split="all")
    for item in items[:3] + items[-2:]:
        out = _jsrt_pipeline()(item)
        image, label = out["image"], out["label"]
        assert image.shape == (1, 2048, 2048) and label.shape == (1, 2048, 2048)
        assert set(label.unique().tolist()) == {0.0, 1.0, 2.0}
        lungs, heart = image[label == 1].mean(), image[label == 2].mean()
        assert lungs < heart - 30, "the palette must be applied: raw JSRT indices are a negative"
        lungs_fraction = float((label == 1).float().mean())
        assert 0.15 < lungs_fraction < 0.45
    # SCR sides are the patient's: left_lung lies on the image's right (MONAI's first axis is x).
    first = _jsrt_pipeline()(items[0])["label"][0]
    raw = LoadImaged("image", reader="PILReader", image_only=True)(items[0])["image"]
    assert raw[first == 1].mean() > raw[first == 2].mean(), "raw indices are the negative"
    masks = LoadMasksd("label", reader="PILReader")(items[0])["label"]
    assert masks.shape == (5, 1024, 1024)  # SCR masks are half the JSRT resolution
    left = int(get_dataset("jsrt-scr").mask_names.index("left_lung"))
    columns = torch.nonzero(masks[left] > 0)[:, 0].float()
    assert columns.mean() > masks.shape[1] / 2


def test_jsrt_clavicles_option(shared_data: Path) -> None:
    item = load_datalist("jsrt-scr", data_root=shared_data / "jsrt-scr", split="all")[0]
    label = _jsrt_pipeline("clavicles")(item)["label"]
    assert set(label.unique().tolist()) == {0.0, 1.0, 2.0, 3.0}


def test_brats2018_real_labels_to_classes_and_regions(shared_data: Path) -> None:
    spec = get_dataset("brats2018")
    item = load_datalist("brats2018", data_root=shared_data / "brats2018", split="all")[0]
    out = Compose(
        [
            LoadImaged("label", image_only=True),
            EnsureChannelFirstd("label"),
            RemapLabelsd("label", spec.label_mapping()),
        ]
    )(item)
    assert set(out["label"].unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
    regions = LabelToRegionsd("label", [[1, 2, 3], [1, 3], [3]])(out)["label"]
    wt, tc, et = (float(r.sum()) for r in regions)
    assert wt > tc > et > 0


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_one_line_naming_case_and_file(tmp_path: Path, suffix: str) -> None:
    import nibabel as nib

    path = tmp_path / f"flair{suffix}"
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)), path
    )
    CheckFilesd("image")({"image": str(path), "case_id": "A1"})  # whole: passes
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])  # the header survives, the voxels do not
    with pytest.raises(
        DatasetError, match=rf"^case 'A1': {path}: (truncated|cannot read this file \(EOFError)"
    ):
        CheckFilesd("image")({"image": str(path), "case_id": "A1"})


def test_a_4d_nifti_where_a_volume_is_expected_is_one_line(tmp_path: Path) -> None:
    import nibabel as nib

    cine, frame = tmp_path / "cine.nii.gz", tmp_path / "frame.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 3), np.float32), np.eye(4)), cine)
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 1), np.float32), np.eye(4)), frame)  # a trailing 1 is 3D
    CheckFilesd("image", spatial_dims=3)({"image": str(frame), "case_id": "A1"})
    CheckFilesd("image")({"image": str(cine), "case_id": "A1"})  # no dimension asked for: any
    with pytest.raises(
        DatasetError,
        match=rf"^case 'A1': {cine}: a 4D image \(6 x 5 x 4 x 3\) where one 3D volume is expected \(a cine",
    ):
        CheckFilesd("image", spatial_dims=3)({"image": str(cine), "case_id": "A1"})


def test_in_plane_grid_pads_with_slice_minimum_crops_and_inverts() -> None:
    """WMH thesis sec. 9.2: narrow slices padded with the slice's own minimum, wide ones centre
    cropped, the voxels never stretched; Invertd maps a prediction back to the volume's grid."""
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(2, 6, 12, 3, generator=gen)  # (C, X, Y, Z): X narrower, Y wider than 8
    img[1, :, :, 2] -= 5  # each channel and slice has its own minimum
    label = (torch.rand(1, 6, 12, 3, generator=gen) > 0.7).float()
    grid = InPlaneGridd("image", "label", size=8, slice_axis=2)
    out = grid({"image": MetaTensor(img), "label": MetaTensor(label)})
    assert out["image"].shape == (2, 8, 8, 3) and out["label"].shape == (1, 8, 8, 3)
    # X padded by one voxel each side with the slice minimum; Y cropped to its centre 8 (2..9)
    assert torch.allclose(out["image"][:, 1:7].as_tensor(), img[:, :, 2:10], atol=1e-6)
    for c in range(2):
        for z in range(3):
            assert torch.all(out["image"][c, [0, 7], :, z] == img[c, :, :, z].min())
    assert torch.equal(out["label"][:, 1:7].as_tensor(), label[:, :, 2:10]) and out["label"][:, 0].sum() == 0

    image_only = InPlaneGridd("image", size=8, slice_axis=2)
    seen = image_only({"image": MetaTensor(img)})
    back = Invertd("pred", image_only, orig_keys="image", nearest_interp=False)(
        {"pred": seen["image"].clone(), "image": seen["image"]}
    )["pred"]
    assert back.shape == img.shape
    assert torch.allclose(back[:, :, 2:10].as_tensor(), img[:, :, 2:10], atol=1e-6)
    assert back[:, :, :2].abs().sum() == 0  # cropped away: nothing predicted there

    sagittal = InPlaneGridd("image", size=8, slice_axis=0)({"image": MetaTensor(img)})["image"]
    assert sagittal.shape == (2, 6, 8, 8)  # the slice axis keeps its length


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


def test_cpu_real_xray_input_is_the_same_picture_whatever_grey_range_the_file_used(
    shared_data: Path, tmp_path: Path
) -> None:
    """A shared JSRT image stored at 239-254 of 255 (as unseen JSRT files are, issue #37) reaches
    the cpu_real recipe's network as nearly the picture its original gives; the poster's fixed
    bit-depth scaling hands the network a nearly white image instead."""
    import runpy
    import sys

    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[1]
    argv = sys.argv
    try:
        sys.argv = ["x", "--data_root", str(shared_data / "jsrt-scr"), "--output", str(tmp_path / "narrow")]
        runpy.run_path(str(root / "bundles/xray/docs/narrow_range.py"), run_name="__main__")
    finally:
        sys.argv = argv
    name = "JPCLN001.IMG.png"
    configs = root / "bundles/xray/configs"

    def network_input(experiment: list[Path], image: Path) -> torch.Tensor:
        parser = ConfigParser()
        parser.read_config([configs / "train.yaml", *experiment])
        parser.update({"dataset": "jsrt-scr", "image_size": 320})
        return parser.get_parsed_content("infer_preprocessing")({"image": str(image)})["image"].as_tensor()

    for experiment, close in (([configs / "experiments/cpu_real.yaml"], True), ([], False)):
        original = network_input(experiment, shared_data / "jsrt-scr/images" / name)
        narrowed = network_input(experiment, tmp_path / "narrow/images" / name)
        correlation = torch.corrcoef(torch.stack([original.flatten(), narrowed.flatten()]))[0, 1].item()
        difference = (original - narrowed).abs().mean().item()
        if close:
            assert correlation > 0.99 and difference < 0.03, (correlation, difference)
        else:  # the poster's scaling: the same structures within 6 % of the scale, near white
            assert narrowed.min() > 0.9 and narrowed.max() - narrowed.min() < 0.07
            assert original.max() - original.min() > 0.5
