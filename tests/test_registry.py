"""The dataset registry against the real samples in ../shared/data, its splits, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from bundle_utils import write_toy_registry
from medseg_monai.data import (
    DatasetError,
    evaluation_cases,
    fold_cases,
    get_dataset,
    list_datasets,
    load_datalist,
    load_registry,
    split_cases,
    training_cases,
    validation_cases,
    write_datalist,
)

REAL_SAMPLES = {
    "brats2018": 6,
    "brats2015-4class": 3,
    "wmh-clinical-flair": 3,
    "ms-lesions-mni": 2,
    "jsrt-scr": 40,
}
REGISTRY = Path(__file__).resolve().parents[1] / "datasets.json"


def test_registry_has_every_required_dataset() -> None:
    ids = set(list_datasets())
    synthetic = {f"{s}-synthetic" for s in ("knee", "brats", "wmh", "lv", "xray")}
    assert synthetic | set(REAL_SAMPLES) | {"wmh2017", "acdc", "knee-mr-bones"} <= ids
    for study in ("knee", "brats", "wmh", "lv", "xray"):
        kinds = {get_dataset(i).kind for i in list_datasets(study)}
        assert kinds == {"real", "synthetic"}, study
    for i in synthetic:
        spec = get_dataset(i)
        twin = get_dataset(spec.layout_of)
        assert (spec.layout, spec.labels, spec.study) == (twin.layout, twin.labels, twin.study)


def test_registry_is_data_only() -> None:
    """No MONAI config expressions (``$...``), references (``@...``) or macros (``%...``)."""

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for k, v in node.items() for s in [k, *strings(v)]]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    assert not [s for s in strings(json.loads(REGISTRY.read_text())) if s[:1] in "$@%"]


def test_label_conventions() -> None:
    brats = get_dataset("brats2018")
    assert brats.label_mapping() == {0: 0, 1: 1, 2: 2, 4: 3}
    assert brats.regions() == {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}
    assert get_dataset("brats2015-4class").regions()["tc"] == [1, 3, 4]
    wmh = get_dataset("wmh2017")
    assert wmh.label_mapping() == {0: 0, 1: 1, 2: 0} and wmh.ignore_values() == [2]
    jsrt = get_dataset("jsrt-scr")
    assert jsrt.class_names() == ["background", "lungs", "heart"]
    assert jsrt.mask_names[:3] == ["right_lung", "left_lung", "heart"]
    assert jsrt.mask_classes() == [[0, 1], [2]]
    assert jsrt.mask_classes("clavicles") == [[0, 1], [2], [3, 4]]
    assert get_dataset("knee-mr-bones").label_mapping("merged") == {0: 0, 1: 1, 2: 1, 3: 1}
    with pytest.raises(DatasetError, match="no class set 'nope'.*known: default"):
        jsrt.class_names("nope")


@pytest.mark.parametrize("dataset_id", sorted(REAL_SAMPLES))
def test_real_sample_case_counts(shared_data: Path, dataset_id: str) -> None:
    items = load_datalist(dataset_id, data_root=shared_data / dataset_id, split="all")
    assert len(items) == REAL_SAMPLES[dataset_id]
    spec = get_dataset(dataset_id)
    for item in items:
        assert len(item["image"]) == len(spec.channels)
        paths = item["image"] + (item["label"] if isinstance(item["label"], list) else [item["label"]])
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
    assert len({it["case_id"] for it in items}) == len(items)


def test_jsrt_load_datalist_from_relative_root(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = REGISTRY.parent
    monkeypatch.chdir(project)
    relative = os.path.relpath(shared_data / "jsrt-scr", project)  # "../shared/data/jsrt-scr" in a checkout
    items = load_datalist("jsrt-scr", data_root=relative, split="all")
    assert len(items) == 40 and items[0]["case_id"] == "JPCLN001"
    assert Path(items[0]["image"][0]).is_absolute()


def test_data_root_from_environment(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_DATA_ROOT", str(shared_data))
    for dataset_id, n in REAL_SAMPLES.items():
        assert len(load_datalist(dataset_id, split="all")) == n


@pytest.mark.parametrize(
    ("dataset_id", "shape", "zooms", "values"),
    [
        ("brats2018", (240, 240, 155), (1.0, 1.0, 1.0), {0, 1, 2, 4}),
        ("brats2015-4class", (240, 240, 155), (1.0, 1.0, 1.0), {0, 1, 2, 3, 4}),
        ("wmh-clinical-flair", (512, 512, 16), (0.47, 0.47, None), {0, 1}),
        ("ms-lesions-mni", (182, 218, 182), (1.0, 1.0, 1.0), {0, 1}),
    ],
)
def test_real_volumes_shape_spacing_labels(shared_data: Path, dataset_id: str, shape, zooms, values) -> None:
    seen: set[int] = set()
    for item in load_datalist(dataset_id, data_root=shared_data / dataset_id, split="all"):
        label = nib.load(item["label"])
        assert label.shape == shape
        for path in item["image"]:
            img = nib.load(path)
            assert img.shape == shape
            np.testing.assert_allclose(img.affine, label.affine, atol=1e-3)
            for z, expected in zip(img.header.get_zooms(), zooms, strict=True):
                if expected is None:  # the clinical FLAIR slices are 7.5-8 mm thick
                    assert 7.4 < z < 8.1
                else:
                    assert z == pytest.approx(expected, abs=0.01)
        seen |= {int(v) for v in np.unique(np.asarray(label.dataobj))}
        assert set(get_dataset(dataset_id).structures) >= seen
    assert seen == values


def test_brats2015_groups_timepoints_by_patient(shared_data: Path) -> None:
    items = load_datalist("brats2015-4class", data_root=shared_data / "brats2015-4class", split="all")
    assert [it["group"] for it in items] == [f"brats_2013_pat000{i}" for i in (1, 2, 3)]
    assert all(Path(it["brainmask"]).name == "brainmask.nii.gz" for it in items)


def test_channel_selection(shared_data: Path) -> None:
    items = load_datalist(
        "ms-lesions-mni", data_root=shared_data / "ms-lesions-mni", split="all", channels=["flair"]
    )
    assert all(len(it["image"]) == 1 and "FLAIR" in it["image"][0] for it in items)
    with pytest.raises(DatasetError, match="no channel t3"):
        load_datalist("ms-lesions-mni", data_root=shared_data / "ms-lesions-mni", channels=["t3"])


def _items(groups: dict[str, int]) -> list[dict]:
    return [{"case_id": f"{g}_{k}", "group": g} for g, n in groups.items() for k in range(n)]


def test_split_is_deterministic_grouped_and_complete() -> None:
    items = _items({f"p{i:03d}": 1 + i % 3 for i in range(50)})
    a = split_cases(items, [0.7, 0.15, 0.15], seed=123)
    assert a == split_cases(items, [0.7, 0.15, 0.15], seed=123)
    assert a != split_cases(items, [0.7, 0.15, 0.15], seed=124)
    groups = {k: {it["group"] for it in v} for k, v in a.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert sorted(it["case_id"] for v in a.values() for it in v) == sorted(it["case_id"] for it in items)
    assert (len(groups["train"]), len(groups["val"]), len(groups["test"])) == (34, 8, 8)


@pytest.mark.parametrize(("n", "expected"), [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (10, (6, 2, 2))])
def test_split_of_tiny_datasets_keeps_training_data(n: int, expected: tuple[int, int, int]) -> None:
    parts = split_cases(_items({f"p{i}": 1 for i in range(n)}), [0.7, 0.15, 0.15], seed=0)
    assert tuple(len(parts[k]) for k in ("train", "val", "test")) == expected


def test_real_split_and_decathlon_datalist(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "jsrt-scr"
    train = load_datalist("jsrt-scr", data_root=root, split="train")
    val = load_datalist("jsrt-scr", data_root=root, split="val")
    assert (len(train), len(val)) == (32, 8)
    assert [it["case_id"] for it in train] == [
        it["case_id"] for it in load_datalist("jsrt-scr", root, "train")
    ]
    with pytest.raises(DatasetError, match="split 'test' is empty"):
        load_datalist("jsrt-scr", data_root=root, split="test")
    out = write_datalist("jsrt-scr", tmp_path / "run" / "datalist.json", data_root=root)
    doc = json.loads(out.read_text())
    assert doc["numTraining"] == 32 and doc["modality"] == {"0": "xray"} and doc["synthetic"] is False
    read = load_decathlon_datalist(out, data_list_key="validation")
    assert [it["case_id"] for it in read] == [it["case_id"] for it in val]
    assert read[0]["image"] == val[0]["image"]


# --- bad input: one clear line, never a traceback maze -------------------------------------------


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDSEG_REGISTRY", str(write_toy_registry(tmp_path)))
    root = tmp_path / "toy"
    _touch(root, "A/1/flair.nii.gz", "A/1/t1.nii.gz", "A/1/wmh.nii.gz")
    return root


def test_unknown_id_lists_known_ones() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'brats2042'; known: brats2018, .*jsrt-scr"):
        load_datalist("brats2042")


def test_missing_root_says_where_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"data root .*nowhere does not exist\. Get it from https://www.med"
    ):
        load_datalist("brats2018", data_root=tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no data root is set: pass data_root or set MEDSEG_DATA_ROOT"):
        load_datalist("wmh2017")


def test_no_case_found_shows_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"no case found under .* matching '\{case\}/\{case\}_flair.nii.gz'"
    ):
        load_datalist("brats2018", data_root=tmp_path)


def test_case_missing_a_modality_or_label_is_named(toy: Path) -> None:
    assert load_datalist("toy", data_root=toy, split="all")[0]["case_id"] == "1"
    (toy / "A/1/t1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case '1' is missing its 't1' image: .*A/1/t1.nii.gz"):
        load_datalist("toy", data_root=toy, split="all")
    assert len(load_datalist("toy", data_root=toy, split="all", channels=["flair"])) == 1
    (toy / "A/1/wmh.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case '1' is missing its label: .*A/1/wmh.nii.gz"):
        load_datalist("toy", data_root=toy, split="all", channels=["flair"])


def test_duplicate_case_ids(toy: Path) -> None:
    _touch(toy, "B/1/flair.nii.gz", "B/1/t1.nii.gz", "B/1/wmh.nii.gz")
    with pytest.raises(
        DatasetError, match=r"duplicate case id '1' \(.*A/1/flair.nii.gz and .*B/1/flair.nii.gz\)"
    ):
        load_datalist("toy", data_root=toy, split="all")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "imaginary"}, r"\$\.datasets\[0\]\.kind: 'imaginary' is not one of"),
        (
            {"split": {"fractions": [0.7, 0.3], "seed": 0}},
            r"\$\.datasets\[0\]\.split\.fractions: .* too short",
        ),
        (
            {"layout": {"case": "x", "images": {}, "label": "y"}},
            r"\$\.datasets\[0\]\.layout\.images: \{\} should be non-empty",
        ),
        (
            {
                "labels": {
                    "structures": {"0": "background"},
                    "classes": {"default": {"background": [], "wmh": ["wmh"]}},
                }
            },
            r"\$\.datasets\[0\]\.labels\.classes\.default\.wmh: unknown structure 'wmh'",
        ),
        ({"layout_of": "toy"}, r"\$\.datasets\[0\]"),
    ],
)
def test_malformed_registry_names_the_json_path(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_registry(write_toy_registry(tmp_path, changes))


def test_registry_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "datasets.json").write_text('{"version": 1,\n "datasets": [}')
    with pytest.raises(DatasetError, match="not valid JSON at line 2 column"):
        load_registry(tmp_path / "datasets.json")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medseg_monai.data", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("datalist", "nope"), "unknown dataset 'nope'"),
        (("datalist", "brats2018", "--data_root", "/nonexistent/brats"), "does not exist. Get it from"),
        (("datalist", "brats2018", "--data_root", "/"), "no case found"),
        (("generate", "brats2018"), "is real: nothing to generate"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(
    args: tuple[str, ...], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg_monai.data.cli import main  # in process: the `python -m` path is tested below

    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_cli_malformed_registry(tmp_path: Path) -> None:
    path = write_toy_registry(tmp_path, {"study": 7})
    result = _cli("list", env={"MEDSEG_REGISTRY": str(path)})
    assert (
        result.returncode == 2 and "$.datasets[0].study" in result.stderr and "Traceback" not in result.stderr
    )


def test_cli_lists_case_ids(shared_data: Path) -> None:
    result = _cli("datalist", "wmh-clinical-flair", "--data_root", str(shared_data / "wmh-clinical-flair"))
    assert result.returncode == 0 and result.stdout.split() == ["2516038876", "2516041494", "2516043217"]


# --- synthetic datasets through the registry -----------------------------------------------------


def test_default_dataset_prefers_configured_real_data(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from medseg_monai.data import default_dataset

    with caplog.at_level("INFO", logger="medseg_monai"):
        assert default_dataset("wmh") == "wmh-synthetic"
    assert [r.message for r in caplog.records] == [
        "no real wmh data under MEDSEG_DATA_ROOT: using synthetic dataset 'wmh-synthetic'"
    ]
    monkeypatch.setenv("MEDSEG_DATA_ROOT", str(shared_data))
    assert default_dataset("wmh") == "wmh-clinical-flair"
    assert default_dataset("xray") == "jsrt-scr"
    assert default_dataset("lv") == "acdc"  # the ACDC samples joined ../shared/data
    assert default_dataset("knee") == "knee-synthetic"  # no public knee MR with bone masks


def test_synthetic_generated_on_first_use_then_cached(caplog: pytest.LogCaptureFixture) -> None:
    from medseg_monai.data import resolve_data_root

    with caplog.at_level("INFO", logger="medseg_monai"):
        items = load_datalist("xray-synthetic", split="all")
        root = resolve_data_root("xray-synthetic")
        assert load_datalist("xray-synthetic", split="all") == items
    generating = [r.message for r in caplog.records if "generating" in r.message]
    assert len(generating) <= 1  # once, unless an earlier test already filled the session cache
    marker = json.loads((root / ".medseg-synthetic.json").read_text())
    assert marker["id"] == "xray-synthetic" and marker["generator"]["name"] == "xray"
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".xray-synthetic")]  # no temp dirs left
    # 120 images (enough for the training-set size sweep up to 105), split 108 / 12
    assert len(items) == 120 and all(len(it["label"]) == 5 for it in items)
    parts = {s: load_datalist("xray-synthetic", split=s) for s in ("train", "val")}
    assert (len(parts["train"]), len(parts["val"])) == (108, 12)


def test_synthetic_into_explicit_root(tmp_path: Path) -> None:
    items = load_datalist("xray-synthetic", data_root=tmp_path / "xr", split="all")
    assert len(items) == 120 and Path(items[0]["image"][0]).is_relative_to(tmp_path / "xr")


def test_datasets_resolved_side_by_side_generate_once_and_report_errors(tmp_path: Path) -> None:
    from medseg_monai.data import resolve_data_roots

    requests = [("lv-synthetic", str(tmp_path / "lv")), ("brats2018", str(tmp_path / "none")), ("nope", None)]
    lv, missing, unknown = resolve_data_roots(requests, workers=2)  # forked workers, as the grid does
    assert (
        lv == tmp_path / "lv"
        and json.loads((lv / ".medseg-synthetic.json").read_text())["id"] == "lv-synthetic"
    )
    assert len(load_datalist("lv-synthetic", data_root=lv, split="all")) == 20
    assert isinstance(missing, DatasetError) and "does not exist" in str(missing)
    assert isinstance(unknown, DatasetError) and "unknown dataset 'nope'" in str(unknown)
    assert resolve_data_roots(requests[:1], workers=2) == [lv]  # already there: found, not made again


def test_train_split_all_trains_on_every_case_and_says_validation_reuses_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts = {
        "train": [{"case_id": "b"}],
        "val": [{"case_id": "c"}],
        "test": [{"case_id": "a"}],
    }
    assert training_cases(parts) == [{"case_id": "b"}] and validation_cases(parts) == [{"case_id": "c"}]
    with caplog.at_level("WARNING"):
        every = training_cases(parts, "all")
        assert validation_cases(parts, "all") == every == [{"case_id": c} for c in "abc"]
    assert "validation reuses them" in caplog.text and "not held-out" in caplog.text
    for wrong in ("val", "test", "everything"):
        with pytest.raises(DatasetError, match="train_split must be one of train, all"):
            validation_cases(parts, wrong)


def test_folds_partition_the_non_test_cases_by_patient() -> None:
    # 13 patients, two of them with a second time point: folds must never split a patient
    items = [
        {"case_id": f"p{g:02d}_{t}", "group": f"p{g:02d}"}
        for g in range(13)
        for t in ((1, 2) if g in (3, 8) else (1,))
    ]
    parts = split_cases(items, [0.8, 0.1, 0.1], seed=0)
    seen: list[str] = []
    for k in range(5):
        fold = fold_cases(parts, k, 5, seed=0)
        assert fold["test"] is parts["test"]
        train = {it["case_id"] for it in fold["train"]}
        val = {it["case_id"] for it in fold["val"]}
        assert not train & val and train | val == {it["case_id"] for it in parts["train"] + parts["val"]}
        assert not {it["group"] for it in fold["train"]} & {it["group"] for it in fold["val"]}
        assert len({it["group"] for it in fold["val"]}) in (2, 3)  # 11 patients over 5 folds
        seen += sorted(val)
    assert sorted(seen) == sorted(
        it["case_id"] for it in parts["train"] + parts["val"]
    )  # each validates once
    assert fold_cases(parts, None) is parts
    assert fold_cases(parts, 2, 5, seed=0) == fold_cases(parts, 2, 5, seed=0)  # deterministic
    assert fold_cases(parts, 2, 5, seed=1) != fold_cases(parts, 2, 5, seed=0)


@pytest.mark.parametrize(
    ("fold", "n_folds", "message"),
    [
        (5, 5, "fold must be a whole number from 0 to 4"),
        (-1, 5, "fold must be a whole number from 0 to 4"),
        (True, 5, "fold must be"),
        (0, 1, "n_folds must be a whole number >= 2"),
        (0, 12, "needs at least 12 patients outside the test part, found 4"),
    ],
)
def test_bad_fold_is_refused_in_one_line(fold: object, n_folds: int, message: str) -> None:
    parts = {
        "train": [{"case_id": c, "group": c} for c in "abc"],
        "val": [{"case_id": "d", "group": "d"}],
        "test": [],
    }
    with pytest.raises(DatasetError, match=message):
        fold_cases(parts, fold, n_folds)  # type: ignore[arg-type]


def test_fold_of_a_real_dataset(shared_data: Path) -> None:
    """A fold of the shared JSRT images (40 patients, one image each)."""
    root = shared_data / "jsrt-scr"
    plain = load_datalist("jsrt-scr", data_root=root, split="val")
    fold = load_datalist("jsrt-scr", data_root=root, split="val", fold=1, n_folds=4)
    train = load_datalist("jsrt-scr", data_root=root, split="train", fold=1, n_folds=4)
    assert len(fold) == 10 and len(train) == 30 and fold != plain  # the registry's split has no test part
    assert not {it["case_id"] for it in fold} & {it["case_id"] for it in train}


def test_an_empty_evaluation_split_is_refused_naming_every_part() -> None:
    parts = {"train": [{"case_id": "a"}, {"case_id": "b"}], "val": [{"case_id": "c"}], "test": []}
    assert evaluation_cases(parts, "val", "toy") == [{"case_id": "c"}]
    assert [it["case_id"] for it in evaluation_cases(parts, "all", "toy")] == ["a", "b", "c"]
    with pytest.raises(
        DatasetError,
        match=r"^split 'test' of dataset 'toy' holds no cases \(train 2, val 1, test 0\): choose another --split$",
    ):
        evaluation_cases(parts, "test", "toy")
