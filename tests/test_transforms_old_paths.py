"""The transforms' old import paths (before #38 made medseg_monai.transforms a package by family)
still work for one release: each moved name is the same object as at its new path, reached with a
DeprecationWarning naming that path; importing an old module warns of nothing, and a name that never
lived there is still missing."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
from monai.bundle import ConfigParser

# (old module, name, new module): every name that left one of these modules in #38
MOVED = [
    *[
        ("medseg_monai.slices", n, "medseg_monai.transforms")
        for n in ("ExtractSlicesd", "EntropySliceFilterd")
    ],
    *[("medseg_monai.slices", n, "medseg_monai.transforms") for n in ("neighbour_indices", "slice_entropy")],
    ("medseg_monai.slices", "stack_neighbours", "medseg_monai.transforms"),
    ("medseg_monai.slices", "SliceDataset", "medseg_monai.data.slices"),
    ("medseg_monai.slices", "NeighbourSliceInferer", "medseg_monai.inferers"),
    *[("medseg_monai.joint", n, "medseg_monai.transforms") for n in ("JointWindowCropd", "RecropToWindowd")],
    *[
        ("medseg_monai.joint", n, "medseg_monai.transforms")
        for n in ("joint_centre", "reference_joint_centre")
    ],
    ("medseg_monai.bias_field", "N4BiasFieldCorrectiond", "medseg_monai.transforms"),
    ("medseg_monai.bias_field", "n4_bias_field", "medseg_monai.transforms"),
    ("medseg_monai.io", "SaveLabelPNGd", "medseg_monai.transforms"),
    ("medseg_monai.io", "apply_palette", "medseg_monai.transforms"),
    ("medseg_monai.visualize", "SaveVolumeOverlayd", "medseg_monai.transforms"),
    ("medseg_monai.data.copies", "OnCopiesd", "medseg_monai.transforms"),
    ("medseg_monai.data", "OnCopiesd", "medseg_monai.transforms"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_a_moved_name_is_found_at_its_old_path_with_a_warning_naming_the_new_one(
    old: str, name: str, new: str
) -> None:
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning) as caught:
        found = getattr(module, name)
    assert found is getattr(importlib.import_module(new), name)
    assert [str(w.message) for w in caught] == [
        f"{old}.{name} is deprecated and goes in the next release: use {new}.{name}"
    ]
    assert caught[0].filename == __file__  # the warning points at the code that used the old path


def test_importing_the_old_modules_warns_of_nothing_and_other_names_stay_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    olds = sorted({old for old, _, _ in MOVED})
    for old in olds:  # imported afresh here; the modules the other tests use are put back after
        parent, _, child = old.rpartition(".")
        monkeypatch.setattr(sys.modules[parent], child, getattr(sys.modules[parent], child))
    for old in olds:
        monkeypatch.delitem(sys.modules, old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = [importlib.import_module(old) for old in olds]
    assert [str(w.message) for w in caught if "medseg_monai" in str(w.message)] == []
    for old, module in zip(olds, fresh, strict=True):
        with pytest.raises(AttributeError, match=f"module '{old}' has no attribute 'NoSuchTransformd'"):
            module.NoSuchTransformd  # noqa: B018


def test_every_public_transform_is_at_the_package_and_the_moved_ones_come_from_it() -> None:
    transforms = importlib.import_module("medseg_monai.transforms")
    assert all(hasattr(transforms, name) for name in transforms.__all__)
    family = {getattr(transforms, n).__module__ for n in transforms.__all__}
    assert family == {
        f"medseg_monai.transforms.{f}" for f in ("io", "intensity", "spatial", "labels", "slices", "utility")
    }
    to_package = {name for _, name, new in MOVED if new == "medseg_monai.transforms"}
    assert to_package <= set(transforms.__all__)


def test_a_config_naming_an_old_target_still_builds_it() -> None:
    """A user's config written before #38: MONAI's ConfigParser resolves the old ``_target_``, warned."""
    parser = ConfigParser(
        {
            "imports": ["$import medseg_monai"],
            "extract": {"_target_": "medseg_monai.slices.ExtractSlicesd", "neighbours": 3},
            "centre": "$medseg_monai.joint.joint_centre",
        }
    )
    parser.parse()
    with pytest.warns(DeprecationWarning, match="use medseg_monai.transforms.ExtractSlicesd"):
        extract = parser.get_parsed_content("extract")
    volume = {"image": torch.arange(4.0).expand(1, 2, 2, 4).clone(), "label": torch.zeros(1, 2, 2, 4)}
    samples = extract(volume)
    assert [s["slice_index"] for s in samples] == [0, 1, 2, 3]
    assert samples[0]["image"][:, 0, 0].tolist() == [0.0, 0.0, 1.0]  # the edge slice repeated
    with pytest.warns(DeprecationWarning, match="use medseg_monai.transforms.joint_centre"):
        centre = parser.get_parsed_content("centre", instantiate=True)
    assert centre is importlib.import_module("medseg_monai.transforms").joint_centre
