"""The helpers the bundles' YAML calls at run time, and nothing else: the error hook and log tidying,
the command-line and input checks, the run's announcements, the device and DDP, rank filtering, the
data loaders and the fast path, metric comparison, and the yes/no, choice and size settings.

The configs name them as ``$medseg_monai.runtime.<name>(...)``. This module builds on the config
layer (``medseg_monai.config``) and the run record; the launcher (``medseg_monai.bundle``) builds on it.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg_monai.config import (
    FLAG_KEYS,
    check_study,
    config_parser,
    fits_kind,
    parse_command_line,
    value_kind,
)
from medseg_monai.data import FOLD_POOLS, SPLITS, get_dataset
from medseg_monai.data.inputs import require_file
from medseg_monai.errors import InputError, OneLineInputErrorFormatter, RunInterrupted, is_input_error, redact
from medseg_monai.record import device_description, is_distributed, rank

__all__ = [
    "announce_run",
    "cache_on_device",
    "check_checkpoint",
    "check_command_line",
    "check_evaluation_dir",
    "check_finite_weights",
    "check_interrupted",
    "choose",
    "data_loader",
    "default_device",
    "distributed_sampler",
    "end_distributed",
    "fast_path",
    "first_non_finite",
    "flag",
    "for_this_rank",
    "init_distributed",
    "install_error_hook",
    "is_distributed",
    "metric_cmp_fn",
    "multiple_of",
    "report_outputs",
    "tidy_logs",
    "wrap_ddp",
]


# ----------------------------------------------------------------------------- errors and logs


def install_error_hook() -> None:
    """End a bundle run on bad input with one ``error:`` line instead of a traceback maze.

    MONAI wraps what fails in a config or a transform in its own exceptions; when the chain holds
    a :class:`~medseg_monai.errors.InputError` (a message that names the file or key at fault) or
    a file that could not be read (``OSError``, e.g. PIL's "cannot identify image file '<path>'",
    nibabel's ``ImageFileError``), only that message is printed. Anything else keeps Python's full
    traceback. Called first in the shared ``initialize``; a no-op when already installed.
    """
    if getattr(sys.excepthook, "medseg_error_hook", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        found = is_input_error(exc)
        if found is None:
            previous(exc_type, exc, tb)
        else:
            print(f"error: {redact(str(found))}", file=sys.stderr)

    hook.medseg_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


class _InputSummary(logging.Filter):
    """MONAI's "input summary" of a bundle run lists the command-line overrides between two rule
    lines, and prints the rules alone when there are none: keep one line per override instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("--- input summary of") or message.strip() == "---":
            return False
        if message.startswith("> "):
            record.msg, record.args = "setting %s", (message[2:],)
        return True


def tidy_logs() -> None:
    """Make the log say what stderr says: input errors as one line (MONAI's handlers log them with
    their traceback; MONAI refuses formatter classes from outside ``logging`` in logging.conf, so
    the formatter goes on the root logger's handlers here), and MONAI's input summary without its
    empty frame. Called in the shared ``initialize``, after logging.conf was applied."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, OneLineInputErrorFormatter):
            fmt = handler.formatter
            handler.setFormatter(
                OneLineInputErrorFormatter(fmt._fmt if fmt else None, fmt.datefmt if fmt else None)
            )
    summary = logging.getLogger("monai.bundle.scripts")
    if not any(isinstance(f, _InputSummary) for f in summary.filters):
        summary.addFilter(_InputSummary())
    # with pydicom installed (the [dicom] extra) every LoadImage MONAI builds says that NVIDIA's
    # nvImageCodec (a GPU decoder) is missing, twice: pydicom's own decoders serve, nothing to do
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


# ----------------------------------------------------------------------------- settings


_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def flag(value: Any, name: str) -> bool:
    """A yes/no setting as a bool: ``True``/``False``, or the strings ``true``/``false`` (also
    ``yes``/``no``, ``1``/``0``) that ``--key true`` on the command line gives; anything else is refused
    (a string ``'false'`` must never count as true)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _FLAGS:
        raise InputError(f"{name} must be true or false, got {value!r}")
    return _FLAGS[text]


def multiple_of(name: str, value: int, multiple: int) -> int:
    """``value`` when it divides by ``multiple`` (a size a U-Net halves log2(multiple) times), else
    refused in one line with the sizes either side, instead of a shape error deep in the network."""
    value, multiple = int(value), int(multiple)
    if value % multiple:
        below, above = value // multiple * multiple, -(-value // multiple) * multiple
        use = f"{below} or {above}" if below else str(above)
        raise InputError(f"{name} {value} is not a multiple of {multiple} (this network's): use {use}")
    return value


def choose(name: str, value: Any, options: Mapping[str, Any]) -> Any:
    """``options[value]`` for a setting that names one of a few variants (e.g. the knee's
    ``label_mode``); anything else is refused in one line that lists the choices."""
    if not isinstance(value, str) or value not in options:
        raise InputError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return options[value]


def _whole(value: Any, least: int | None = None) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and (least is None or value >= least)


def _monai_syntax(value: Any) -> bool:  # an expression or reference, checked when MONAI builds it
    return isinstance(value, str) and value.startswith(("$", "@"))


def _positive_number(value: Any) -> bool:
    return _monai_syntax(value) or (_number(value) and value > 0)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_flag(value: Any) -> bool:  # what flag() accepts
    return isinstance(value, bool) or str(value).strip().lower() in _FLAGS


# The contract keys the command line may set, each with what it takes (the launcher's --help shows
# it; a wrong value is refused as "<key> must be <what it takes>, got <value>") and the test of it.
CONTRACT_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{
        key: ("a positive whole number", lambda v: _whole(v, 1))
        for key in ("max_epochs", "val_interval", "validations_per_epoch", "batch_size", "val_batch_size")
    },
    "learning_rate": ("a positive number (e.g. 1e-3)", _positive_number),
    "image_size": ("a positive whole number", lambda v: _whole(v, 1)),
    "train_size": (
        "null (every training case) or a positive whole number",
        lambda v: v is None or _whole(v, 1),
    ),
    "num_workers": ("a whole number >= 0", lambda v: _whole(v, 0)),
    "cache_rate": ("a number from 0 to 1", lambda v: _number(v) and 0 <= v <= 1),
    "weight_decay": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "seed": ("a whole number", _whole),
    **{key: ("true or false", _is_flag) for key in FLAG_KEYS},
    "fold": ("a whole number from 0 (one fold of n_folds)", lambda v: v is None or _whole(v, 0)),
    "n_folds": ("a whole number >= 2", lambda v: _whole(v, 2)),
    "fold_pool": (f"one of {', '.join(FOLD_POOLS)}", lambda v: v in FOLD_POOLS),
    "train_split": ("train or all", lambda v: v in ("train", "all")),
    "split": (f"one of {', '.join(SPLITS)}", lambda v: v in SPLITS),
    **{
        key: ("a name or path", lambda v: isinstance(v, str))
        for key in ("dataset", "output_dir", "ckpt_path", "input_path")
    },
    "data_root": (
        "the folder of the dataset's files (null: as datasets.json says)",
        lambda v: v is None or isinstance(v, str),
    ),
    "register": (
        "a name to register the best model under in MLflow (null: none)",
        lambda v: v is None or isinstance(v, str),
    ),
}


def _check_value(key: str, value: Any) -> None:
    """A contract key of the command line, checked before anything runs."""
    takes, accepts = CONTRACT_KEYS.get(key, ("", lambda v: True))
    if not accepts(value):
        raise InputError(f"{key} must be {takes}, got {value!r}")


def _ids(config: Any, prefix: str = "") -> Iterator[str]:
    """Every id of a raw config (``a``, ``a#b``, ``a#0``...), as overrides name them."""
    items = (
        config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    )
    for key, value in items:
        name = f"{prefix}{key}"
        yield name
        yield from _ids(value, name + "#")


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Refuse, in one line, an override that names no setting of the run's configs (with the nearest
    one: ``--max_epoch`` -> ``max_epochs``) and a contract key of the wrong type (``--max_epochs abc``,
    ``--resume maybe``, ``--split tst``), before anything is loaded or trained. Reads this process's
    command line (the launcher sets it for in-process runs); a no-op for bundles built from Python."""
    files, _, overrides = parse_command_line(sys.argv if argv is None else argv)
    if not files:
        return
    parser = config_parser(files)
    known = set(_ids(parser.get()))
    for key, value in overrides.items():
        if key not in known:
            top = sorted(k for k in known if "#" not in k)
            near = difflib.get_close_matches(key, top if "#" not in key else sorted(known), n=1, cutoff=0.6)
            hint = (
                f"did you mean '{near[0]}'?" if near else "the settings are the keys at the top of train.yaml"
            )
            raise InputError(f"unknown setting '{key}' (--{key}) for {', '.join(files)}: {hint}")
        # MONAI's command line passes `--loss#batch false` as the text 'false', which a network or
        # loss takes as true; only the flags read through flag() accept text
        if isinstance(parser.get(key), bool) and not isinstance(value, bool) and key not in FLAG_KEYS:
            why = " (text, which would count as true)" if isinstance(value, str) else ""
            raise InputError(
                f"{key} is true or false: write --{key} True or --{key} False, got {value!r}{why}"
            )
        _check_value(key, value)
        if key not in CONTRACT_KEYS and "#" not in key:
            _check_kind(key, value, parser.get(key))


def _check_kind(key: str, value: Any, own: Any) -> None:
    """A top-level setting given on the command line as the kind of value the bundle's own is
    (:func:`~medseg_monai.config.fits_kind`: a whole number for ``--lr_patience``, a list for
    ``--crop_size``): ``--lr_patience abc`` is refused here, not in a traceback from deep inside the
    engine. MONAI syntax (``$``, ``@``) passes."""
    if not _monai_syntax(value) and not fits_kind(value, own):
        raise InputError(f"{key} must be {value_kind(own)} (the bundle's: {own!r}), got {value!r}")


# ----------------------------------------------------------------------------- checks and announcements


def announce_run(
    *,
    study: str,
    experiment: str,
    seed: int,
    profile: str,
    dataset: str,
    device: Any,
    n_train: int,
    n_val: int,
    max_epochs: int,
    output_dir: str,
) -> None:
    """Say at the start what is about to run: where, on what, for how long, and how to check the
    pipeline in minutes instead (the quick profile)."""
    log = logging.getLogger("medseg_monai.progress")
    kind = get_dataset(dataset).kind
    log.info(
        "%s/%s seed %d, %s profile, on %s: dataset %s (%s, %d training / %d validation cases), %d epochs -> %s",
        study, experiment, seed, profile, device_description(device), dataset, kind, n_train, n_val, max_epochs, output_dir,
    )  # fmt: skip
    if profile != "quick":
        log.info(
            "the %s profile runs the paper's settings (GPU hours); to check the pipeline in minutes: "
            "python -m medseg_monai.bundle %s --profile quick",
            profile,
            study,
        )


def report_outputs(output_dir: str, n_inputs: int) -> None:
    """Say where an inference wrote its predictions (on stdout, whatever the logging)."""
    files = (
        sorted(p.name for p in Path(output_dir).iterdir() if p.is_file()) if Path(output_dir).is_dir() else []
    )
    shown = ", ".join(files[:4]) + (f", ... ({len(files)} files)" if len(files) > 4 else "")
    print(f"segmented {n_inputs} input(s): predictions in {Path(output_dir).resolve()} ({shown})", flush=True)


def check_interrupted(trainer: Any, output_dir: str) -> None:
    """After ``trainer.run()``: a run a signal stopped ends the process with one line, non-zero."""
    signal_name = getattr(trainer.state, "interrupted", None)
    if not signal_name:
        return
    if not (Path(output_dir) / "checkpoint.pt").is_file():  # TrainingCheckpoint's, after each epoch
        raise RunInterrupted(
            f"training stopped by {signal_name} during epoch {max(trainer.state.epoch, 1)}, before any epoch was "
            f"complete: nothing in {output_dir} to resume; run the same command again to start over"
        )
    raise RunInterrupted(
        f"training stopped by {signal_name} during epoch {trainer.state.epoch}; the last complete epoch "
        f"is checkpointed in {output_dir}: continue with --resume true"
    )


def check_evaluation_dir(output_dir: str, ckpt_path: str) -> None:
    """An evaluation writes beside the checkpoint it evaluates or into the ``--output_dir`` given:
    a ``--ckpt_path`` outside the default ``output_dir`` (that of the study, experiment, profile and
    seed, perhaps the run the checkpoint was copied from) without ``--output_dir`` is refused in one
    line. Reads this process's command line; the launcher passes the checkpoint's folder itself."""
    _, _, given = parse_command_line(sys.argv)
    if "ckpt_path" not in given or "output_dir" in given:
        return
    folder = Path(ckpt_path).expanduser().resolve().parent
    if folder != Path(output_dir).expanduser().resolve():
        raise InputError(
            f"the checkpoint {ckpt_path} is not in output_dir {output_dir}, where this evaluation would "
            f"write: pass --output_dir {folder} (beside it) or another folder"
        )


def first_non_finite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor of ``named`` (``state_dict().items()``,
    ``named_parameters()``) holding a NaN or an infinity, without DDP's ``module.`` prefix; else None."""
    import torch

    return next(
        (
            k.removeprefix("module.")
            for k, v in named
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ),
        None,
    )


def check_finite_weights(state: dict[str, Any], ckpt_path: str | Path) -> None:
    """Refuse, in one line, network weights that hold a NaN or an infinity (a diverged training's,
    e.g. a ``model_final.pt`` saved before ``StopOnNonFiniteLoss`` stopped such runs): they would
    score or segment as if they were a model."""
    broken = first_non_finite(state.items())
    if broken is not None:
        raise InputError(
            f"checkpoint {ckpt_path} holds weights that are not finite ('{broken}'): the training that "
            "wrote it diverged; train again with a lower --learning_rate"
        )


def check_checkpoint(ckpt_path: str, network: Any, study: str = "<study>") -> str:
    """``ckpt_path`` if its weights fit ``network``; otherwise one line saying which tensor differs
    and how to use the settings the checkpoint was trained with (its ``config.json``)."""
    import torch

    require_file(ckpt_path, "checkpoint")
    check_study(ckpt_path, study)
    try:  # tensors and plain values only (weights_only): nothing in the file runs
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a text file, a pickle of objects: torch says which
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(
            f"checkpoint {ckpt_path} is not a readable PyTorch checkpoint ({reason}): truncated, damaged "
            "or another kind of file; give the model.pt a training wrote"
        ) from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"checkpoint {ckpt_path} holds no network weights (a {type(state).__name__} of something else): "
            "give the model.pt a training wrote"
        )
    own = network.state_dict()
    own = {k.removeprefix("module."): v for k, v in own.items()}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    check_finite_weights(state, ckpt_path)
    problem = next(
        (
            f"'{k}' is {tuple(state[k].shape)} there, {tuple(v.shape)} here"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ),
        None,
    )
    missing = [k for k in own if k not in state]
    if problem is None and missing:
        problem = f"it has no '{missing[0]}' ({len(missing)} tensors missing)"
    if problem is None:
        return ckpt_path
    recorded = Path(ckpt_path).resolve().parent / "config.json"
    how = (
        f"it was trained with the settings in {recorded}: evaluate or apply it with "
        f"python -m medseg_monai.bundle {study} --mode evaluate|inference --ckpt_path {ckpt_path}"
        if recorded.is_file()
        else "layer the experiment and profile it was trained with"
    )
    raise InputError(f"checkpoint {ckpt_path} does not fit this network ({problem}): {how}")


# ----------------------------------------------------------------------------- engine helpers


def default_device() -> Any:
    """``cuda:<LOCAL_RANK>`` under torchrun, ``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")


def init_distributed(device: Any) -> bool:
    """Join the process group when started by torchrun with several processes (``WORLD_SIZE`` > 1):
    NCCL on GPUs, gloo on CPU. Returns whether the run is distributed."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return True


def end_distributed() -> None:
    """Leave the process group at the end of a successful run (the layer's ``finalize``), all ranks
    together: a rank that tore down its gloo connections while rank 0 was still saving and logging
    was aborted at exit (SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(network: Any, device: Any) -> Any:
    """``network`` in ``DistributedDataParallel`` when the run is distributed, else unchanged."""
    import torch

    if not is_distributed():
        return network
    dev = torch.device(device)
    return torch.nn.parallel.DistributedDataParallel(
        network, device_ids=[dev] if dev.type == "cuda" else None
    )


def distributed_sampler(dataset: Any, shuffle: bool) -> Any:
    """MONAI's ``DistributedSampler`` over ``dataset`` under DDP (training shards are padded to equal
    length, validation shards are not), else None (the data loader's own order).

    A validation set smaller than the number of processes would leave a process without a case,
    which MONAI refuses: its shards are then padded with repeated cases, and the log says that
    the validation means count those cases twice."""
    if not is_distributed():
        return None
    import torch.distributed as dist
    from monai.data import DistributedSampler

    world = dist.get_world_size()
    pad = shuffle or len(dataset) < world
    if pad and not shuffle:
        logging.getLogger("medseg_monai.bundle").warning(
            "validation has %d case(s) for %d processes: cases are repeated to give each one, and the "
            "validation means count them more than once",
            len(dataset),
            world,
        )
    sampler = DistributedSampler(dataset, shuffle=shuffle, even_divisible=pad)
    logging.getLogger("medseg_monai.bundle").info(
        "rank %d of %d: %d of the %d %s cases",
        dist.get_rank(),
        world,
        len(sampler),
        len(dataset),
        "training" if shuffle else "validation",
    )
    return sampler


def _rank0_only(handler: Any) -> bool:
    """Whether ``handler`` logs, tracks or writes files, and so runs on rank 0 only: the suite's
    handlers say so themselves (a ``rank0_only`` class attribute); MONAI's and ignite's that do are
    named here."""
    from ignite.handlers import ProgressBar
    from monai.handlers import CheckpointSaver, StatsHandler

    own = getattr(type(handler), "rank0_only", False)
    return own or isinstance(handler, (StatsHandler, CheckpointSaver, ProgressBar))


def for_this_rank(handlers: Sequence[Any]) -> list[Any]:
    """``handlers`` without those that log, track or write files on ranks > 0 of a DDP run; the
    others (validation, LR stepping, per-case metrics, which gather across ranks) stay on every rank."""
    handlers = [h for h in handlers if h is not None]
    if rank() == 0:
        return handlers
    return [h for h in handlers if not _rank0_only(h)]


# the fast path (``fast: true``, MONAI's fast-training guide): the wiring's data loaders, the trainer's
# and evaluator's transfers, the training cache's device and the cuDNN settings follow one switch


def _on_cuda(device: Any) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def data_loader(dataset: Any, fast: Any = False, **kwargs: Any) -> Any:
    """The wiring's data loader: MONAI's ``ThreadDataLoader`` (``num_workers=0``: the transforms run
    in one background thread, the next batch ready while the network trains, which suits a cache
    held on the GPU) when ``fast``, else MONAI's ``DataLoader``; ``kwargs`` (batch size, sampler,
    shuffle, ...) go to either."""
    from monai.data import DataLoader, ThreadDataLoader

    if flag(fast, "fast"):
        return ThreadDataLoader(dataset, **{**kwargs, "num_workers": 0})
    return DataLoader(dataset, **kwargs)


def cache_on_device(keys: Any, device: Any, fast: Any = False) -> list[Any]:
    """The transform that ends a study's cached (deterministic) transforms on the fast path:
    ``[EnsureTyped(keys, device=device)]`` when ``fast`` and ``device`` is a GPU, so the cache is
    held on the GPU and the random transforms after it run there; else ``[]`` (the cache stays in
    host memory, as without ``fast``)."""
    if not (flag(fast, "fast") and _on_cuda(device)):
        return []
    from monai.transforms import EnsureTyped

    return [EnsureTyped(keys=keys, device=device)]


def fast_path(fast: Any, device: Any) -> bool:
    """Set up the run for ``fast`` (call after ``monai.utils.set_determinism``, which turns cuDNN's
    benchmark off): on a GPU ``torch.backends.cudnn.benchmark = True`` and non-deterministic cuDNN,
    so cuDNN picks its fastest kernels and the run is no longer bit-for-bit reproducible (seeds
    still fix the initialisation, the data order and the augmentation). Says in one line what the
    fast path does here; returns whether it is on."""
    import torch

    if not flag(fast, "fast"):
        return False
    log = logging.getLogger("medseg_monai.progress")
    if _on_cuda(device):
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        log.info(
            "fast: ThreadDataLoader, training cache on %s (random transforms there), non-blocking "
            "transfers, cudnn.benchmark on: not bit-for-bit reproducible",
            device,
        )
    else:
        log.info("fast: ThreadDataLoader, non-blocking transfers (no GPU: the cache stays in memory)")
    return True


def metric_cmp_fn(mode: str) -> Any:
    """The evaluator's best-metric comparison for ``mode``: ``max`` (higher is better) or ``min``."""
    if mode not in ("max", "min"):
        raise InputError(f"key_metric_mode must be 'max' or 'min', got '{mode}'")
    return (lambda current, best: current > best) if mode == "max" else (lambda current, best: current < best)
