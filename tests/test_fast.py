"""The GPU fast path (``--fast true``, MONAI's fast-training guide), checked on the CPU.

``fast`` swaps the wiring's data loaders for MONAI's ``ThreadDataLoader``, makes the trainer's and
evaluator's transfers non-blocking (and the trainer's ``zero_grad`` free the gradients), turns
cuDNN's benchmark on and, on a GPU, ends each study's cached training transforms with
``EnsureTyped(device=...)``, so the cache is held there and the random transforms after it run
there. Without a GPU the cache stays in memory and a fast run writes what any run writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader, ThreadDataLoader
from monai.transforms import EnsureTyped, RandomizableTrait, Transform

from bundle_utils import metric_values, mlflow_client, parse_study, run_bundle
from medseg_monai.config import studies
from medseg_monai.errors import InputError
from medseg_monai.runtime import cache_on_device, check_command_line, data_loader, fast_path

STUDIES = studies()
# one training and one validation case, nothing cached: the engines build without loading the data
SMALL = {
    "train_datalist": "$@datalist['train'][:1]",
    "val_datalist": "$@datalist['val'][:1]",
    "cache_rate": 0.0,
}


@pytest.mark.parametrize("value", [True, "true", "yes", "1"])
def test_fast_is_a_thread_data_loader(value: object) -> None:
    loader = data_loader([1, 2, 3], fast=value, batch_size=2, num_workers=2)
    assert isinstance(loader, ThreadDataLoader) and loader.num_workers == 0  # the thread does the work
    assert [b.tolist() for b in loader] == [[1, 2], [3]]


@pytest.mark.parametrize("value", [False, "false", "no", "0"])
def test_default_is_monai_data_loader(value: object) -> None:
    loader = data_loader([1, 2, 3], fast=value, batch_size=2)
    assert type(loader) is DataLoader


def test_a_bad_fast_value_is_refused_in_one_line() -> None:
    with pytest.raises(InputError, match="fast must be true or false, got 'maybe'"):
        data_loader([1], fast="maybe")
    argv = ["monai.bundle", "run", "--config_file", "bundles/xray/configs/train.yaml", "--fast", "maybe"]
    with pytest.raises(InputError, match="fast must be true or false"):
        check_command_line(argv)  # before anything loads


def test_the_cache_moves_to_the_gpu_only_with_fast_on_a_gpu() -> None:
    assert cache_on_device(["image", "label"], torch.device("cpu"), True) == []
    assert cache_on_device(["image", "label"], torch.device("cuda"), False) == []
    (move,) = cache_on_device(["image", "label"], torch.device("cuda:0"), "true")
    assert isinstance(move, EnsureTyped) and move.keys == ("image", "label")
    assert move.converter.device == torch.device("cuda:0")


def test_fast_path_sets_cudnn_benchmark_on_a_gpu_only() -> None:
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True  # set_determinism
        assert not fast_path(False, "cuda") and not torch.backends.cudnn.benchmark
        assert fast_path(True, "cpu") and not torch.backends.cudnn.benchmark  # CPU: cuDNN untouched
        assert fast_path("yes", torch.device("cuda:0"))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.parametrize("fast", [True, False])
def test_every_bundle_builds_the_fast_engines(study: str, fast: bool, tmp_path: Path) -> None:
    parser = parse_study(study, profile="quick", fast=str(fast).lower(), output_dir=str(tmp_path), **SMALL)
    loaders = [parser.get_parsed_content(k) for k in ("train#dataloader", "validate#dataloader")]
    assert all(isinstance(loader, ThreadDataLoader) == fast for loader in loaders)
    assert all(isinstance(loader, DataLoader) for loader in loaders)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.non_blocking is fast and trainer.optim_set_to_none is fast
    assert parser.get_parsed_content("validate#evaluator").non_blocking is fast
    tracker = parser.get_parsed_content("train#handlers#0")
    assert tracker.params["fast"] is fast  # an MLflow param of the run


def _cached_part(study: str, **overrides: object) -> list:
    """The transforms of the study's training cache, as if the run were on a GPU (nothing is loaded:
    the cache is empty)."""
    parser = parse_study(study, fast="true", device="$torch.device('cuda:0')", **SMALL, **overrides)
    # the WMH cache is the volumes; its slices are flipped by the data set that draws from them
    dataset = parser.get_parsed_content("train_volumes" if study == "wmh" else "train_dataset")
    return list(dataset.transform.transforms)


@pytest.mark.parametrize("study", STUDIES)
def test_on_a_gpu_the_cache_ends_on_it_and_the_random_transforms_follow(study: str) -> None:
    transforms = _cached_part(study)  # the paper's settings: their augmentation
    moves = [
        i
        for i, t in enumerate(transforms)
        if isinstance(t, EnsureTyped) and t.converter.device == torch.device("cuda:0")
    ]
    assert len(moves) == 1, [type(t).__name__ for t in transforms]
    random = [
        i
        for i, t in enumerate(transforms)
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    ]
    # CacheDataset caches up to the first random transform: the move is cached, the random ones run
    # on the GPU after it
    assert all(i > moves[0] for i in random), [type(t).__name__ for t in transforms]
    if study in ("brats", "knee", "lv"):
        assert random, "the paper's augmentation runs after the cache"


@pytest.mark.parametrize("study", STUDIES)
def test_validation_caches_all_its_preprocessing(study: str) -> None:
    """No step of the validation transforms counts as random (a nested ``Compose`` would: the cache
    would stop there and the rest run at every validation)."""
    dataset = parse_study(study, **SMALL).get_parsed_content("validate#dataset")
    random = [
        type(t).__name__
        for t in dataset.transform.transforms
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    ]
    assert random == []


@pytest.mark.parametrize("study", STUDIES)
def test_on_the_cpu_the_cache_stays_in_memory(study: str) -> None:
    parser = parse_study(study, fast="true", **SMALL)
    key = "train_volumes" if study == "wmh" else "train_dataset"
    transforms = parser.get_parsed_content(key).transform.transforms
    assert not any(isinstance(t, EnsureTyped) and t.converter.device is not None for t in transforms)


def test_xray_quick_fast_run_writes_the_contract(tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    result = run_bundle("xray", store, output_dir=out, max_epochs=2, fast="true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast: ThreadDataLoader" in result.stderr + result.stdout
    for name in ("model.pt", "model_final.pt", "checkpoint.pt", "run.json", "config.json", "datalist.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["fast"] in (True, "true")
    client = mlflow_client(store)
    run = client.search_runs([client.get_experiment_by_name("xray").experiment_id])[0]
    assert run.data.params["fast"] == "True" and run.info.status == "FINISHED"
    assert len(metric_values(client, run.info.run_id, "val_dice")) == 2


@pytest.mark.slow
def test_xray_fast_on_the_cpu_trains_as_the_default_does(tmp_path: Path) -> None:
    """On the CPU only the loader changes (the same batches, in the same order): the same numbers."""
    histories = []
    for fast in ("true", "false"):
        store = tmp_path / f"mlflow-{fast}"
        result = run_bundle("xray", store, output_dir=tmp_path / fast, max_epochs=2, fast=fast)
        assert result.returncode == 0, result.stderr[-3000:]
        client = mlflow_client(store)
        run = client.search_runs([client.get_experiment_by_name("xray").experiment_id])[0]
        histories.append([metric_values(client, run.info.run_id, m) for m in ("train_loss", "val_dice")])
    assert histories[0] == histories[1]
