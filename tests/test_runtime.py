"""The helpers the bundles' YAML calls at run time (medseg_monai.runtime): metric comparison, rank
filtering, the DDP helpers outside DDP, and the contract-key checks of the command line."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from monai.handlers import CheckpointSaver, StatsHandler, ValidationHandler

from medseg_monai import runtime
from medseg_monai.config import config_files
from medseg_monai.errors import InputError
from medseg_monai.handlers import CaseMetrics, MLflowTracker, ProgressLog
from medseg_monai.metrics.lesions import LesionTableWriter
from medseg_monai.visualize import OverlaySaver


def test_metric_comparison() -> None:
    assert runtime.metric_cmp_fn("max")(0.6, 0.5) and not runtime.metric_cmp_fn("max")(0.4, 0.5)
    assert runtime.metric_cmp_fn("min")(0.4, 0.5) and not runtime.metric_cmp_fn("min")(0.6, 0.5)
    with pytest.raises(InputError, match="key_metric_mode must be 'max' or 'min'"):
        runtime.metric_cmp_fn("higher")


class _OwnWriter:
    """A handler of someone's own that writes files: it says so, and is left to rank 0."""

    rank0_only: ClassVar[bool] = True


def test_rank_filter_keeps_writers_on_rank_0_only(monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: list[Any] = [
        MLflowTracker("s", "r", "/tmp"),
        ValidationHandler(interval=1, validator=None),
        CaseMetrics({"d": "dice"}, ["a"]),
        StatsHandler(),
        CheckpointSaver("/tmp", {"m": torch.nn.Linear(1, 1)}),
        ProgressLog(),
        LesionTableWriter(None, "/tmp"),
        OverlaySaver("/tmp"),
        _OwnWriter(),
        None,  # a disabled config component
    ]
    assert runtime.for_this_rank(handlers) == handlers[:-1]
    monkeypatch.setattr(runtime, "rank", lambda: 1)
    kept = runtime.for_this_rank(handlers)
    assert [type(h).__name__ for h in kept] == ["ValidationHandler", "CaseMetrics"]


def test_distributed_helpers_are_no_ops_in_one_process() -> None:
    net = torch.nn.Linear(2, 2)
    assert not runtime.is_distributed() and not runtime.init_distributed("cpu")
    assert runtime.wrap_ddp(net, "cpu") is net
    assert runtime.distributed_sampler([1, 2, 3], shuffle=True) is None
    assert runtime.default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("key", "good", "bad", "message"),
    [
        ("max_epochs", 3, 0, "max_epochs must be a positive whole number, got 0"),
        ("batch_size", 2, True, "batch_size must be a positive whole number, got True"),
        ("learning_rate", "$1e-3 * 2", -1.0, "learning_rate must be a positive number (e.g. 1e-3), got -1.0"),
        ("seed", -5, 1.5, "seed must be a whole number, got 1.5"),
        ("resume", "yes", "maybe", "resume must be true or false, got 'maybe'"),
        ("fold", None, -1, "fold must be a whole number from 0 (one fold of n_folds), got -1"),
        ("n_folds", 2, 1, "n_folds must be a whole number >= 2, got 1"),
        ("fold_pool", "all", "every", "fold_pool must be one of train_val, all, got 'every'"),
        ("train_split", "all", "val", "train_split must be train or all, got 'val'"),
        ("split", "test", "tst", "split must be one of train, val, test, all, got 'tst'"),
        ("ckpt_path", "runs/model.pt", 3, "ckpt_path must be a name or path, got 3"),
        ("data_root", None, 3, "data_root must be the folder of the dataset's files"),
        ("register", "xray-unet", ["a"], "register must be a name to register the best model under"),
        ("image_size", 64, 0, "image_size must be a positive whole number, got 0"),
        ("train_size", None, 0, "train_size must be null (every training case) or a positive whole number"),
        ("num_workers", 0, -1, "num_workers must be a whole number >= 0, got -1"),
        ("cache_rate", 0.5, 2, "cache_rate must be a number from 0 to 1, got 2"),
        ("weight_decay", 0, -1e-4, "weight_decay must be a number >= 0, got -0.0001"),
    ],
)
def test_contract_keys_take_their_kind_of_value(key: str, good: Any, bad: Any, message: str) -> None:
    runtime._check_value(key, good)
    with pytest.raises(InputError) as refused:
        runtime._check_value(key, bad)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    ("study", "argv", "message"),
    [
        ("xray", ["--lr_patience", "abc"], "lr_patience must be a whole number (the bundle's: 5), got 'abc'"),
        ("xray", ["--momentum", "high"], "momentum must be a number (the bundle's: 0.999), got 'high'"),
        ("brats", ["--crop_size", "96"], "crop_size must be a list (the bundle's: [160, 144, 128]), got 96"),
        (
            "xray",
            ["--features", "64"],
            "features must be a list (the bundle's: [64, 128, 256, 512, 1024]), got 64",
        ),
        ("xray", ["--lr_patience", "3", "--momentum", "1", "--features", "[8, 16, 32, 64, 128]"], None),
        ("xray", ["--lr_patience", "$2 + 1"], None),  # MONAI's syntax: checked when built
    ],
)
def test_other_settings_take_the_kind_of_value_the_bundle_has(
    study: str, argv: list[str], message: str | None
) -> None:
    """Beyond the contract keys: ``--image_size abc``, ``--train_size 0``, ``--weight_decay -1`` and
    ``--lr_patience abc`` ended in tracebacks from deep inside the engine (or trained silently)."""
    files = config_files(study)
    args = ["run", *(a for f in files for a in ("--config_file", f)), *argv]
    if message is None:
        runtime.check_command_line(args)
        return
    with pytest.raises(InputError) as refused:
        runtime.check_command_line(args)
    assert str(refused.value) == message


def test_a_training_size_beyond_the_data_set_is_said(caplog: pytest.LogCaptureFixture) -> None:
    from medseg_monai.data import take

    items = [{"case_id": str(i)} for i in range(5)]
    with caplog.at_level("WARNING"):
        assert take(items, 3, seed=1) == take(items, 3, seed=1) and len(take(items, 3, seed=1)) == 3
        assert not caplog.records
        assert take(items, 9, seed=1) == items
    assert [r.getMessage() for r in caplog.records] == [
        "train_size 9 is more than the 5 training cases: all 5 train"
    ]
