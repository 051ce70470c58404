"""One line for every bad input (issue #41 item 10): a wrong setting, a file of the wrong kind or
geometry, a damaged checkpoint or store, another study's checkpoint and a full disk each end the run
with one ``error:`` line naming the file or setting, and leave nothing half-written as a result.

Each case checks the exit status, the single ``error:`` line and what is left on disk."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle_utils import ROOT, error_lines, local_store_env, run_python_module
from medseg_monai import tracking
from medseg_monai.bundle import main
from medseg_monai.config import command_line, config_files
from medseg_monai.data import DatasetError, load_splits, resolve_data_root
from medseg_monai.errors import InputError
from medseg_monai.runtime import check_checkpoint
from medseg_monai.transforms import CheckFilesd

TINY = {"image_size": 32, "dataset": "xray-synthetic", "max_epochs": 1, "train_size": 4}


def _one_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _launch(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """The launcher in this process (what ``python -m medseg_monai.bundle`` runs): status, error line."""
    status = main(args)
    return status, _one_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_batch_size_below_one_is_one_line(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    status, line = _launch(
        ["xray", "--profile", "quick", "--output_dir", str(out), "--batch_size", value], capsys
    )
    assert status == 2 and line == f"error: batch_size must be a positive whole number, got {value}"
    assert not out.exists()  # refused before anything runs


@pytest.mark.parametrize(
    ("value", "shown"), [("abc", "'abc'"), ("-0.001", "-0.001"), ("0", "0"), ("nan", "'nan'")]
)
def test_a_learning_rate_that_is_not_a_positive_number_is_one_line(
    value: str, shown: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    args = ["xray", "--profile", "quick", "--output_dir", str(out), "--learning_rate", value]
    status, line = _launch(args, capsys)
    assert status == 2 and line == f"error: learning_rate must be a positive number (e.g. 1e-3), got {shown}"
    assert not out.exists()


@pytest.mark.slow
def test_a_training_that_diverges_stops_in_one_line_and_saves_no_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = {**TINY, "max_epochs": 3, "learning_rate": 1e30}
    args = command_line(config_files("xray", profile="quick"), output_dir=str(out), **settings)
    result = run_python_module(args, local_store_env(tmp_path / "mlflow"), 600)
    assert result.returncode == 1
    line = _one_error(result.stderr)
    assert re.fullmatch(
        r"error: training diverged at epoch \d, iteration \d+ \(learning rate 1e\+30\): (the loss is nan and )?"
        r"the weights are no longer finite \('[\w.]+'\); train again with a lower --learning_rate",
        line,
    ), line
    assert not (out / "model_final.pt").exists() and not (out / "metrics.json").exists()
    if (out / "model.pt").exists():  # the best of the epochs before: validated, and finite
        best = torch.load(out / "model.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"


# ----------------------------------------------------------------------------- checkpoints


def test_another_studys_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "lv-run"  # what an LV training leaves: its weights beside its run record
    run.mkdir()
    torch.save({"w": torch.zeros(1)}, run / "model.pt")
    (run / "run.json").write_text(json.dumps({"study": "lv", "experiment": "baseline", "seed": 0}))
    before = sorted(p.name for p in run.iterdir())
    status, line = _launch(["xray", "--mode", "evaluate", "--ckpt_path", str(run / "model.pt")], capsys)
    assert status == 2
    assert line == (
        f"error: checkpoint {run / 'model.pt'} was trained by the lv bundle ({run / 'run.json'}), not xray: "
        f"python -m medseg_monai.bundle lv --mode evaluate|inference --ckpt_path {run / 'model.pt'}"
    )
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written beside it


def test_a_checkpoint_with_weights_that_are_not_finite_is_refused(tmp_path: Path) -> None:
    # what a diverged training's model_final.pt would hold: the network's own tensors, one of them NaN
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    state = net.state_dict()
    state["1.bias"] = torch.tensor([float("nan")])
    torch.save(state, tmp_path / "model_final.pt")
    with pytest.raises(InputError) as caught:
        check_checkpoint(str(tmp_path / "model_final.pt"), net)
    assert str(caught.value) == (
        f"checkpoint {tmp_path / 'model_final.pt'} holds weights that are not finite ('1.bias'): the training "
        "that wrote it diverged; train again with a lower --learning_rate"
    )
    torch.save(net.state_dict(), tmp_path / "model.pt")  # the same network, finite: accepted
    assert check_checkpoint(str(tmp_path / "model.pt"), net) == str(tmp_path / "model.pt")


def _damaged(kind: str, folder: Path) -> Path:
    folder.mkdir()
    path = folder / "model.pt"
    if kind == "truncated":
        torch.save({"conv.weight": torch.randn(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:3000])  # an interrupted download
    else:
        path.write_text("<html>404 Not Found</html>\n")  # a web page saved under the checkpoint's name
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "not a checkpoint"])
def test_a_damaged_model_pt_is_one_line(kind: str, tmp_path: Path) -> None:
    ckpt = _damaged(kind, tmp_path / "run")
    out = tmp_path / "eval"
    args = command_line(
        config_files("xray", "evaluate", profile="quick"), ckpt_path=str(ckpt), output_dir=str(out)
    )
    result = run_python_module(args, local_store_env(tmp_path / "mlflow"), 600)
    assert result.returncode == 1
    line = _one_error(result.stderr)
    assert line.startswith(f"error: checkpoint {ckpt} is not a readable PyTorch checkpoint (")
    assert line.endswith("): truncated, damaged or another kind of file; give the model.pt a training wrote")
    assert not (out / "metrics.json").exists() and not (out / "eval_val_run.json").exists()


# ----------------------------------------------------------------------------- files of the wrong kind


def _nifti(path: Path, shape: tuple[int, ...], sform: np.ndarray | None = None, zooms=None) -> Path:
    """A NIfTI of ones whose header says ``sform`` (code 1, no qform) and ``zooms`` as written:
    nibabel's own writer would refuse or mend both."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4) if sform is None else sform, code=1)
    header.set_qform(None, code=0)
    image = nib.Nifti1Image(np.ones(shape, dtype=np.float32), None, header)
    if zooms is not None:  # after the constructor, which mends a zero one
        image.header["pixdim"][1:4] = zooms
    nib.save(image, path)
    return path


def test_a_zero_or_nonfinite_spacing_and_a_singular_affine_are_one_line(tmp_path: Path) -> None:
    check = CheckFilesd("image", spatial_dims=3)
    zero = _nifti(tmp_path / "zero.nii.gz", (4, 4, 4), zooms=(1.0, 0.0, 1.0))
    with pytest.raises(
        DatasetError, match=rf"^{zero}: voxel spacing 1 x 0 x 1 mm \(header pixdim\): a spacing"
    ):
        check({"image": str(zero)})  # nibabel would read it as 1 mm
    nan = _nifti(tmp_path / "nan.nii.gz", (4, 4, 4), zooms=(1.0, np.nan, 1.0))
    with pytest.raises(DatasetError, match=rf"^{nan}: voxel spacing 1 x nan x 1 mm"):
        check({"image": str(nan)})
    flat = np.diag([1.0, 1.0, 0.0, 1.0])  # every voxel in one plane
    singular = _nifti(tmp_path / "singular.nii.gz", (4, 4, 4), sform=flat)
    with pytest.raises(
        DatasetError, match=rf"^{singular}: its affine \(1 0 0 0; 0 1 0 0; 0 0 0 0\) is singular"
    ):
        check({"image": str(singular)})
    check({"image": str(_nifti(tmp_path / "fine.nii.gz", (4, 4, 4), sform=np.diag([0.5, 0.5, 3.0, 1.0])))})


def test_a_colour_radiograph_is_refused_and_a_grey_one_passes(tmp_path: Path) -> None:
    check = CheckFilesd("image", grey_keys="image")
    for mode in ("RGB", "RGBA", "LA"):
        Image.new(mode, (8, 8)).save(tmp_path / f"{mode}.png")
        with pytest.raises(
            DatasetError, match=rf"^{tmp_path / mode}.png: a colour image \({mode}\) where a grey"
        ):
            check({"image": str(tmp_path / f"{mode}.png")})
    grey_palette = Image.new("P", (8, 8))
    grey_palette.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # JSRT's inverted grey palette
    colour_palette = Image.new("P", (8, 8))
    colour_palette.putpalette([v for i in range(256) for v in (i, 0, 0)])
    grey_palette.save(tmp_path / "grey_palette.png")
    colour_palette.save(tmp_path / "colour_palette.png")
    Image.new("L", (8, 8)).save(tmp_path / "L.png")
    Image.new("I;16", (8, 8)).save(tmp_path / "I16.png")
    for name in ("grey_palette", "L", "I16"):
        check({"image": str(tmp_path / f"{name}.png")})
    with pytest.raises(DatasetError, match=r"colour_palette.png: a colour image \(P\)"):
        check({"image": str(tmp_path / "colour_palette.png")})
    CheckFilesd("image")({"image": str(tmp_path / "RGB.png")})  # only where a grey image is expected


def _spoilt_copy(dataset: str, tmp_path: Path, spoil) -> Path:
    """A copy of ``dataset``'s files (generated on first use) with ``spoil`` applied to every image."""
    copy = tmp_path / "data"
    shutil.copytree(resolve_data_root(dataset), copy)
    for part in load_splits(dataset, copy).values():
        for case in part:
            for image in case["image"] if isinstance(case["image"], list) else [case["image"]]:
                spoil(Path(image))
    return copy


def _four_d(path: Path) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.stack([np.asarray(image.dataobj)] * 2, axis=-1), image.affine), path)


def _rewritten(path: Path, sform: np.ndarray, zooms=None) -> None:
    """``path`` written again with ``sform`` (code 1, no qform) and, if given, ``zooms`` as its
    header's pixdim (nibabel's writer would mend a zero one)."""
    image = nib.load(path)
    header = image.header.copy()
    header.set_sform(sform, code=1)
    header.set_qform(None, code=0)
    image = nib.Nifti1Image(np.asarray(image.dataobj), None, header)
    if zooms is not None:  # after the constructor, which mends a zero one
        image.header["pixdim"][1:4] = zooms
    nib.save(image, path)


def _zero_spacing(path: Path) -> None:
    image = nib.load(path)
    _rewritten(path, image.affine, zooms=(image.header.get_zooms()[0], 0.0, image.header.get_zooms()[2]))


def _singular(path: Path) -> None:
    affine = nib.load(path).affine.copy()
    affine[:3, 2] = 0.0  # the third axis goes nowhere
    _rewritten(path, affine)


def _rgb(mode: str):
    return lambda path: Image.open(path).convert(mode).save(path)


BAD_FILES = [  # (study, dataset, spoil, what the line says)
    ("knee", "knee-synthetic", _four_d, "a 4D image"),
    ("brats", "brats-synthetic", _four_d, "a 4D image"),
    ("wmh", "wmh-synthetic", _four_d, "a 4D image"),
    ("lv", "lv-synthetic", _four_d, "a 4D image"),
    ("lv", "lv-synthetic", _zero_spacing, "(header pixdim): a spacing of zero or not a number"),
    ("lv", "lv-synthetic", _singular, "is singular or not finite"),
    ("xray", "xray-synthetic", _rgb("RGB"), "a colour image (RGB) where a grey radiograph is expected"),
    ("xray", "xray-synthetic", _rgb("RGBA"), "a colour image (RGBA) where a grey radiograph is expected"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("study", "dataset", "spoil", "said"), BAD_FILES, ids=lambda v: getattr(v, "__name__", v)
)
def test_a_file_of_the_wrong_kind_stops_training_in_one_line(
    study: str, dataset: str, spoil, said: str, tmp_path: Path
) -> None:
    data, out = _spoilt_copy(dataset, tmp_path, spoil), tmp_path / "run"
    overrides = {"dataset": dataset, "data_root": str(data), "output_dir": str(out), "max_epochs": 1}
    args = command_line(config_files(study, profile="quick"), **overrides)
    result = run_python_module(args, local_store_env(tmp_path / "mlflow"), 600)
    assert result.returncode == 1
    line = _one_error(result.stderr)
    assert line.startswith("error: case '") and f": {data}/" in line and said in line, line
    assert not any((out / name).exists() for name in ("model.pt", "checkpoint.pt", "model_final.pt"))


# ----------------------------------------------------------------------------- the tracking store


def _store(kind: str, folder: Path) -> Path:
    """A local MLflow store damaged as ``kind``, in ``folder``."""
    folder.mkdir(parents=True)
    db = folder / "mlflow.db"
    if kind == "empty":
        db.write_bytes(b"")
    elif kind == "not sqlite":
        db.write_text("these are my notes\n")
    else:  # a store MLflow made, cut short as an interrupted copy would be
        tracking.open_client(f"sqlite:///{db}").search_experiments()
        whole = db.read_bytes()
        db.write_bytes(whole[: len(whole) // 2])
    return db


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("empty", "is an empty file (a truncated copy?)"),
        ("not sqlite", "is not an SQLite database"),
        ("truncated", "is truncated ("),
    ],
)
def test_a_damaged_mlflow_store_is_refused_not_replaced(
    kind: str, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _store(kind, tmp_path / "mlflow")
    before = db.read_bytes()
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(db.parent))
    for check in (tracking.check_tracking_uri, tracking.open_client):
        with pytest.raises(InputError, match="^" + re.escape(f"the MLflow store {db} {said}")) as refused:
            check()
        assert str(refused.value).endswith(
            f"restore it from a copy, or move it away to start a new store at {db}"
        )
    assert db.read_bytes() == before  # not made into a new, empty store


def test_a_new_store_and_a_whole_one_pass(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    tracking.check_sqlite_store(db)  # none yet: MLflow makes it
    tracking.open_client(f"sqlite:///{db}").search_experiments()
    tracking.check_sqlite_store(db)
    with sqlite3.connect(tmp_path / "other.db") as other:
        other.execute("CREATE TABLE notes (text)")
    with pytest.raises(InputError, match="holds another program's database"):
        tracking.check_sqlite_store(tmp_path / "other.db")


@pytest.mark.slow
def test_training_with_an_empty_mlflow_db_stops_before_writing(tmp_path: Path) -> None:
    db = _store("empty", tmp_path / "mlflow")
    out = tmp_path / "run"
    args = command_line(config_files("xray", profile="quick"), output_dir=str(out), **TINY)
    result = run_python_module(args, local_store_env(db.parent), 600)
    assert result.returncode == 1
    assert _one_error(result.stderr) == (
        f"error: the MLflow store {db} is an empty file (a truncated copy?): restore it from a copy, or move "
        f"it away to start a new store at {db}"
    )
    assert db.stat().st_size == 0 and not (out / "run.json").exists()


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ignite.engine import Engine

    from medseg_monai.handlers.resume import TrainingCheckpoint

    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    saver = TrainingCheckpoint(str(tmp_path), {"network": net})
    engine.state.epoch, engine.state.iteration = 1, 4
    saver._save(engine)  # epoch 1 written
    kept = (tmp_path / "checkpoint.pt").read_bytes()
    save = torch.save

    def full(obj, f, *args, **kwargs):  # the disk fills up halfway through epoch 2's checkpoint
        Path(f).write_bytes(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", full)
    engine.state.epoch = 2
    with pytest.raises(InputError) as refused:
        saver._save(engine)
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path / 'checkpoint.pt'))} after epoch 2: no space left on the device "
        r"\(\d+ MB free\); epoch 1's checkpoint is kept: free space, then --resume true",
        str(refused.value),
    )
    assert not (tmp_path / "checkpoint.tmp").exists() and (tmp_path / "checkpoint.pt").read_bytes() == kept
    monkeypatch.setattr(torch, "save", save)


_FULL_DISK = """
import errno, json, os, sys
import torch
save = torch.save
def full(obj, f, *args, **kwargs):  # the disk fills up while the epoch's checkpoint is written
    if str(f).endswith("checkpoint.tmp"):
        with open(f, "wb") as half:
            half.write(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return save(obj, f, *args, **kwargs)
torch.save = full
from medseg_monai.bundle import run
from medseg_monai.config import config_files
from medseg_monai.runtime import install_error_hook
install_error_hook()
run(config_files("xray", profile="quick"), **json.loads(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_full_disk_says_no_space_left_and_leaves_no_temporary_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, json.dumps({**TINY, "output_dir": str(out)})],
        cwd=ROOT,
        env=local_store_env(tmp_path / "mlflow"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 1
    line = _one_error(result.stderr)
    assert line.startswith(f"error: {out / 'checkpoint.pt'} after epoch 1: no space left on the device (")
    assert line.endswith("MB free); no epoch was checkpointed: free space, then run the same command again")
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_checkpoint_path_with_a_quote_is_trained_and_evaluated(tmp_path: Path) -> None:
    out, env = tmp_path / "it's" / "run", local_store_env(tmp_path / "mlflow")
    trained = run_python_module(
        command_line(config_files("xray", profile="quick"), output_dir=str(out), **TINY), env, 600
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    args = [
        sys.executable,
        "-m",
        "medseg_monai.bundle",
        "xray",
        "--mode",
        "evaluate",
        "--ckpt_path",
        str(out / "model.pt"),
    ]
    evaluated = run_python_module(args, env, 600)
    assert evaluated.returncode == 0 and not error_lines(evaluated), evaluated.stderr[-3000:]
    assert "dice" in json.loads((out / "metrics_val.json").read_text())["mean"]  # beside the checkpoint
