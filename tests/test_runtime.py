"""The helpers the bundles' YAML calls at run time (medseg_monai.runtime): metric comparison, rank
filtering, the DDP helpers outside DDP, and the contract-key checks of the command line."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from monai.handlers import CheckpointSaver, StatsHandler, ValidationHandler

from medseg_monai import runtime
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
    ],
)
def test_contract_keys_take_their_kind_of_value(key: str, good: Any, bad: Any, message: str) -> None:
    runtime._check_value(key, good)
    with pytest.raises(InputError) as refused:
        runtime._check_value(key, bad)
    assert str(refused.value).startswith(message)
