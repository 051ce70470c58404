"""Issue #40 items 1 and 2: a run exported as a MONAI model-zoo bundle that runs from any directory
and segments as the repository does; TorchScript and ONNX exports of every bundle's networks that
match PyTorch through the bundle's own inferer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_utils import ROOT, error_lines, local_store_env, run_bundle, run_python_module, train_quick
from medseg_monai.config import config_parser
from medseg_monai.export import ATOL, RTOL, export_network, freeze_config, network_input, recording_builds

onnxruntime = pytest.importorskip(
    "onnxruntime", reason="ONNX Runtime not installed: pip install -e .[deploy]"
)

STUDIES = ("brats", "knee", "lv", "wmh", "xray")


def test_freeze_writes_expressions_back_as_components() -> None:
    """References inlined as values, an expression's transforms as components, a shared object as one
    top-level id, the runtime id kept as a reference; the written config builds transforms that do
    what the originals do, and MONAI objects build as usual afterwards."""
    parser = ConfigParser(
        {
            "size": 4,
            "out_dir": "/somewhere",
            "resize": {"_target_": "Resized", "keys": "image", "spatial_size": "$[@size] * 2"},
            "pre": {
                "_target_": "Compose",
                "transforms": "$[@resize, monai.transforms.ScaleIntensityd(keys='image')]",
            },
            "post": {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@out_dir", "resample": False},
        }
    )
    written, medseg = freeze_config(
        parser, {"pre": "preprocessing", "post": "postprocessing"}, {"out_dir": "output_dir"}
    )
    assert written == {
        "preprocessing": {
            "_target_": "Compose",
            "transforms": ["@resize", {"_target_": "monai.transforms.ScaleIntensityd", "keys": "image"}],
        },
        "postprocessing": {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "resample": False,
        },
        "resize": {"_target_": "Resized", "keys": "image", "spatial_size": [4, 4]},
    }
    assert medseg == []
    image = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8)
    rebuilt = ConfigParser({**written, "output_dir": "/x"}).get_parsed_content("preprocessing")
    original = parser.get_parsed_content("pre")
    np.testing.assert_allclose(rebuilt({"image": image})["image"], original({"image": image})["image"])
    assert rebuilt({"image": image})["image"].shape == (1, 4, 4)
    with recording_builds():
        pass
    from monai.transforms import Resized

    assert Resized("image", spatial_size=(2, 2))({"image": image})["image"].shape == (1, 2, 2)


def _grid_networks(study: str) -> list[tuple[str, object]]:
    """(experiment, parser) of each distinct network of the study's quick grid."""
    from medseg_monai.reproduce import plan

    seen, out = set(), []
    for job in plan("quick", studies=[study], seeds=[0]):
        parser = config_parser(job.configs, {**job.overrides, "seed": 0})
        key = repr(parser.get_parsed_content("network_def"))  # layers, widths, dropout rates
        if key not in seen:
            seen.add(key)
            out.append((job.experiment, parser))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_exports_match_pytorch_through_the_bundles_inferer(study: str, tmp_path: Path) -> None:
    """Every network the quick grid trains (the paper profile's networks are the same classes,
    wider), exported to TorchScript and ONNX on its first window, gives PyTorch's logits within
    RTOL/ATOL through the bundle's own inferer (sliding window for BraTS and the knee, slices for
    WMH) on a synthetic case after the bundle's validation preprocessing."""
    networks = _grid_networks(study)
    assert networks
    for experiment, parser in networks:
        torch.manual_seed(0)
        net = parser.get_parsed_content("network_def").eval()
        case = parser.get_parsed_content("val_datalist")[0]
        image, window = network_input(parser, case)
        models = tmp_path / experiment
        checks = export_network(net, window, models)
        inferer = parser.get_parsed_content("val_inferer")
        from medseg_monai.export import OnnxNetwork

        with torch.no_grad():
            ref = inferer(image, net)
            scripted = inferer(image, torch.jit.load(str(models / "model.ts")))
            onnx = inferer(image, OnnxNetwork(models / "model.onnx"))
        for name, out in (("torchscript", scripted), ("onnx", onnx)):
            torch.testing.assert_close(
                torch.as_tensor(out),
                torch.as_tensor(ref),
                rtol=RTOL,
                atol=ATOL,
                msg=f"{study}/{experiment} {name}",
            )
        # what a user sees: the same classes everywhere but where PyTorch's top two logits nearly tie
        agree = (torch.as_tensor(onnx).argmax(1) == torch.as_tensor(ref).argmax(1)).float().mean().item()
        assert agree > 0.999, (study, experiment, agree)
        assert checks["torchscript"].split(" ")[0] in ("script", "trace")


@pytest.fixture(scope="module")
def xray_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_quick("xray", tmp_path_factory, max_epochs=2)


@pytest.mark.slow
def test_exported_bundle_runs_elsewhere_and_matches(xray_run: tuple[Path, Path], tmp_path: Path) -> None:
    out, store = xray_run
    bundle = tmp_path / "bundle"
    exported = run_python_module(
        [sys.executable, "-m", "medseg_monai.export", str(out), "--output", str(bundle)],
        local_store_env(store),
        timeout=600,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    for part in (
        "configs/inference.json", "configs/evaluate.json", "configs/metadata.json", "models/model.pt",
        "models/model.ts", "models/model.onnx", "docs/README.md", "LICENSE",
    ):  # fmt: skip
        assert (bundle / part).is_file(), part
    configs = (bundle / "configs" / "inference.json").read_text() + (
        bundle / "configs" / "evaluate.json"
    ).read_text()
    assert "%" not in configs and "bundles/" not in configs and str(ROOT) not in configs
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image_format = meta["network_data_format"]["inputs"]["image"]
    assert image_format["spatial_shape"] == [48, 48] and image_format["num_channels"] == 1
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    assert meta["exported_run"]["dataset"]["id"] == "xray-synthetic"
    assert "medseg_monai.networks.ClassicUNet" in meta["medseg_monai_components"]

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = json.loads((out / "datalist.json").read_text())["validation"][0]
    (inputs / "case.png").write_bytes(Path(case["image"][0]).read_bytes())
    repo = run_bundle(
        "xray",
        store,
        mode="inference",
        input_path=inputs,
        ckpt_path=out / "model.pt",
        output_dir=tmp_path / "repo",
    )
    assert repo.returncode == 0, repo.stderr[-3000:]
    expected = np.array(Image.open(tmp_path / "repo" / "case_label.png"))
    assert set(np.unique(expected)) <= {0, 1, 2}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for engine in ("torch", "onnxruntime"):
        result = subprocess.run(
            [
                sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                "--bundle_root", str(bundle), "--input_path", str(inputs), "--output_dir", str(tmp_path / engine),
                "--engine", engine,
            ],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        label = np.array(Image.open(tmp_path / engine / "case_label.png"))
        if engine == "torch":
            np.testing.assert_array_equal(label, expected)
        else:  # logits within 1e-4: a pixel may flip only where two classes tie
            assert (label == expected).mean() > 0.999
    verified = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
            "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        ],
        cwd=bundle, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr[-3000:]


def test_export_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    result = run_python_module(
        [sys.executable, "-m", "medseg_monai.export", str(tmp_path), "--output", str(tmp_path / "out")],
        local_store_env(tmp_path / "mlflow"),
        timeout=120,
    )
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: {tmp_path}: no model.pt in it (a run folder holds its best checkpoint there)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_inference_engines_of_the_repository(xray_run: tuple[Path, Path], tmp_path: Path) -> None:
    """--engine onnxruntime segments as eager does (Dice >= 0.998 against eager's classes), bf16
    nearly so; an unknown engine stops with one line and writes nothing."""
    from medseg_monai.bench import agreement_dice

    out, store = xray_run
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = json.loads((out / "datalist.json").read_text())["validation"][0]
    (inputs / "case.png").write_bytes(Path(case["image"][0]).read_bytes())
    labels = {}
    for engine in ("torch", "bf16", "onnxruntime"):
        result = run_bundle(
            "xray", store, mode="inference", input_path=inputs, ckpt_path=out / "model.pt",
            output_dir=tmp_path / engine, engine=engine,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        labels[engine] = torch.as_tensor(
            np.array(Image.open(tmp_path / engine / "case_label.png")).astype(np.int64)
        )
    # ONNX Runtime computes what eager does; bfloat16 need not (0.990 on this quick model: the bench
    # measures each engine's agreement and --engine bf16 is the user's choice, never the default)
    assert agreement_dice(labels["onnxruntime"], labels["torch"]) >= 0.998
    assert agreement_dice(labels["bf16"], labels["torch"]) >= 0.95
    bad = run_bundle(
        "xray", store, mode="inference", input_path=inputs, ckpt_path=out / "model.pt",
        output_dir=tmp_path / "bad", engine="tensorrt",
    )  # fmt: skip
    assert bad.returncode != 0
    assert error_lines(bad) == ["error: engine 'tensorrt' is not one of torch, bf16, onnxruntime"]
    assert not (tmp_path / "bad" / "case_label.png").exists()
