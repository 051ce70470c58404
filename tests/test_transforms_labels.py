"""Label transforms on hand-made tensors and on the real JSRT/SCR and BraTS files: class indices of
an output, file values to classes, masks to a label map, labels to regions, a merged map split per
bone, per-structure maps to file values."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, PILReader
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClasses,
    EnsureChannelFirstd,
    LoadImaged,
)

from medseg_monai.data import DatasetError, get_dataset, load_datalist
from medseg_monai.transforms import (
    Argmaxd,
    LabelToRegionsd,
    LoadMasksd,
    MapsToLabeld,
    MasksToLabeld,
    RemapLabelsd,
    ResizeToMatchd,
    SplitByNearestLabeld,
    apply_palette,
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


def test_merged_prediction_split_by_nearest_reference_bone() -> None:
    label = torch.zeros(1, 1, 10)
    label[0, 0, 1:3] = 1  # femur
    label[0, 0, 6:8] = 2  # tibia
    pred = torch.zeros(1, 1, 10)
    pred[0, 0, [0, 1, 2, 3, 5, 6, 9]] = 1
    out = SplitByNearestLabeld("pred", classes=[1, 2, 3])({"pred": pred, "label": label})["pred"]
    assert out.shape == (3, 1, 10)
    assert out[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert out[1, 0].nonzero().flatten().tolist() == [5, 6, 9]
    assert out[2].sum() == 0  # no fibula in the reference
    empty = SplitByNearestLabeld("pred")({"pred": pred, "label": torch.zeros(1, 1, 10)})["pred"]
    assert empty.sum() == 0


def test_maps_to_label_takes_the_most_probable_bone_above_threshold() -> None:
    maps = torch.tensor([[0.9, 0.6, 0.1, 0.4], [0.2, 0.7, 0.2, 0.3], [0.0, 0.0, 0.3, 0.45]])[:, None]
    label = MapsToLabeld("pred", values=[1, 2, 3])({"pred": maps})["pred"]
    assert label.flatten().tolist() == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="2 maps for 3 label values"):
        MapsToLabeld("pred", values=[1, 2, 3])({"pred": maps[:2]})


def test_oai_zib_like_labels_without_fibula_keep_the_bone_channels(tmp_path) -> None:
    """A label with femur and tibia only: the fibula map is empty, not an error."""
    label = np.zeros((8, 8, 4), np.uint8)
    label[:, :4] = 1
    label[:, 5:] = 2
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "l.nii.gz")
    d = LoadImaged("label", image_only=True, ensure_channel_first=True)({"label": str(tmp_path / "l.nii.gz")})
    maps = LabelToRegionsd("label", [[1], [2], [3]])(d)["label"]
    assert maps.shape == (3, 8, 8, 4) and maps[2].sum() == 0 and maps[0].sum() == 8 * 4 * 4
