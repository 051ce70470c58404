"""Running the suite's bundles: the launcher, and the helpers the shared wiring calls.

The launcher builds the config-file list of a (study, mode, experiment, profile) and runs it with the
bundle's ``metadata.json`` and ``logging.conf`` passed explicitly; reproduce, bench and the tests go
through it. The wiring (``bundles/common/configs``) calls the engine helpers here (device, DDP,
rank filtering, metric comparison, the fast path, the error hook) and ``medseg_monai.record.prepare_run``.

    python -m medseg_monai.bundle <study> [--mode train|evaluate|inference|multi_gpu_train]
        [--experiment NAME] [--profile quick] [--dry_run] [--key value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg_monai.data import DatasetError
from medseg_monai.errors import InputError, RunInterrupted, is_input_error, redact
from medseg_monai.paths import project_root
from medseg_monai.record import parse_command_line
from medseg_monai.timing import Stopwatch

__all__ = [
    "MODES",
    "at_repo_root",
    "announce_run",
    "bundle_root",
    "cache_on_device",
    "check_checkpoint",
    "check_command_line",
    "check_evaluation_dir",
    "check_interrupted",
    "command_line",
    "config_parser",
    "config_files",
    "data_loader",
    "default_device",
    "channel_cases",
    "default_output_dir",
    "distributed_sampler",
    "end_distributed",
    "fast_path",
    "flag",
    "for_this_rank",
    "image_files",
    "init_distributed",
    "install_error_hook",
    "is_distributed",
    "meta_files",
    "metric_cmp_fn",
    "report_outputs",
    "require_file",
    "recorded_settings",
    "run",
    "run_name",
    "studies",
    "tidy_logs",
    "wrap_ddp",
]

MODES = ("train", "evaluate", "inference", "multi_gpu_train")


# ----------------------------------------------------------------------------- where things are


def bundle_root(study: str) -> str:
    """``<repo>/bundles/<study>``, whatever the working directory."""
    return str(project_root() / "bundles" / study)


def _fold_suffix(fold: int | None, sep: str) -> str:
    return "" if fold is None else f"{sep}fold{fold}"


def _named_dataset(study: str | None, dataset: str | None) -> str | None:
    """``dataset`` when it is not the one ``study`` uses by default (``medseg_monai.data.default_dataset``),
    else None: only a run on another dataset carries its id in its folder and run name, so the
    default's names (grids, docs) stay as they were."""
    if dataset is None or study is None:
        return None
    from medseg_monai.data import default_dataset, get_dataset

    if dataset == default_dataset(study, announce=False):
        return None
    return get_dataset(dataset).id  # a registered id (refused in one line otherwise), never a path


def default_output_dir(
    study: str,
    experiment: str,
    seed: int,
    profile: str = "paper",
    fold: int | None = None,
    dataset: str | None = None,
) -> str:
    """``<repo>/runs/<study>/<profile>/[<dataset>/]<experiment>/seed<seed>[_fold<k>]`` (git-ignored): a
    quick check never lands on a full run's results, nor one fold on another's, nor a run on another
    dataset than the study's default (named) on the default's."""
    named = _named_dataset(study, dataset)
    base = project_root() / "runs" / study / profile
    return str((base / named if named else base) / experiment / f"seed{seed}{_fold_suffix(fold, '_')}")


def run_name(
    experiment: str,
    seed: int,
    profile: str = "paper",
    fold: int | None = None,
    dataset: str | None = None,
    study: str | None = None,
) -> str:
    """The MLflow run name: ``<experiment> seed<seed>[ fold<k>]``, then in brackets the profile unless
    the paper's and the dataset unless ``study``'s default, e.g. ``baseline seed0 (quick, jsrt-scr)``."""
    qualifiers = [q for q in (None if profile == "paper" else profile, _named_dataset(study, dataset)) if q]
    return f"{experiment} seed{seed}{_fold_suffix(fold, ' ')}" + (
        f" ({', '.join(qualifiers)})" if qualifiers else ""
    )


def studies(bundles_dir: str | Path | None = None) -> list[str]:
    """The studies with a bundle: every ``bundles/<study>/configs/train.yaml`` but the shared wiring's."""
    base = Path(bundles_dir) if bundles_dir is not None else project_root() / "bundles"
    return sorted(
        p.parent.parent.name for p in base.glob("*/configs/train.yaml") if p.parent.parent.name != "common"
    )


# ----------------------------------------------------------------------------- the launcher


def config_files(
    study: str,
    mode: str = "train",
    experiment: str | None = None,
    profile: str | None = None,
    bundles_dir: str | Path | None = None,
) -> list[str]:
    """The ``--config_file`` list of a run, in layering order: the study's ``train.yaml``, the
    experiment (``configs/experiments/<experiment>.yaml``, or a path relative to ``configs/``), the
    profile (``configs/<profile>.yaml``, e.g. ``quick``; none for ``default`` and ``paper``), then the
    mode's layer (``evaluate.yaml``, ``inference.yaml``, ``multi_gpu_train.yaml``). Paths are relative
    to the repository root, where bundles run, when ``bundles_dir`` is inside it."""
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    root = project_root()
    base = Path(bundles_dir).resolve() if bundles_dir is not None else root / "bundles"
    configs = base / study / "configs"
    files = [configs / "train.yaml"]
    if experiment:
        name = experiment if experiment.endswith(".yaml") else f"experiments/{experiment}.yaml"
        files.append(configs / name)
    if profile and profile not in ("default", "paper"):
        files.append(configs / f"{profile}.yaml")
    if mode != "train":
        files.append(configs / f"{mode}.yaml")
    named = [(f.relative_to(root) if f.is_relative_to(root) else f).as_posix() for f in files]
    for f, name in zip(files, named, strict=True):
        if not f.is_file():
            raise InputError(f"no config {name} (studies: {', '.join(studies(base))})")
    return named


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


# what evaluation never reads from a run's record: the wiring and the training-only sections come
# from the bundle's own files, so nothing written there can reach the evaluation; output_dir is where
# the run was, not how it trained (a copied folder's record names the original)
_UNREAD = (
    "_meta_", "imports", "initialize", "run", "finalize", "train", "validate", "infer", "device", "amp",
    "network", "loss", "optimizer", "lr_scheduler", "output_dir",
)  # fmt: skip
_SPECIAL_KEY = re.compile(r"_[a-z]+_")  # MONAI's _target_, _requires_, _disabled_, _mode_, _desc_


def _not_plain(value: Any, key: str) -> tuple[str, Any] | None:
    """The first id under ``key`` (``key``, ``key#i``, ...) whose value MONAI would not take as written:
    an expression (``$``, run with ``eval``), a reference (``@``), a macro (``%``, which reads another
    file) or a special key such as ``_target_`` (a component to build); None for plain data."""
    if isinstance(value, str):
        return (key, value) if value.startswith(("$", "@", "%")) else None
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if isinstance(value, list):
        return next((f for i, v in enumerate(value) if (f := _not_plain(v, f"{key}#{i}"))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or _SPECIAL_KEY.fullmatch(k):
                return (f"{key}#{k}", v)
            if found := _not_plain(v, f"{key}#{k}"):
                return found
        return None
    return (key, value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    return {float: "a number", str: "a text", list: "a list", dict: "a mapping"}.get(type(value), "null")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _not_plain_error(where: Path, found: tuple[str, Any]) -> InputError:
    return InputError(
        f"{where}: '{found[0]}' holds {_short(found[1])}, which MONAI would run or build: a run's "
        "record is read as plain values only (name --experiment and --profile to evaluate with the "
        "bundle's own files)"
    )


def _recorded_differences(recorded: Any, own: Any, key: str, where: Path, out: dict[str, Any]) -> None:
    """Into ``out``: the ids under ``key`` where the record differs from the bundle's own config, each
    a plain value of the kind the bundle's value is; anything else is refused in one line."""
    if recorded == own:
        return
    same_keys = isinstance(recorded, dict) and isinstance(own, dict) and recorded.keys() == own.keys()
    same_length = isinstance(recorded, list) and isinstance(own, list) and len(recorded) == len(own)
    if same_keys or same_length:
        for k, v in recorded.items() if isinstance(recorded, dict) else enumerate(recorded):
            _recorded_differences(v, own[k], f"{key}#{k}", where, out)
        return
    found = _not_plain(recorded, key)
    if found is None and _SPECIAL_KEY.fullmatch(key.rpartition("#")[2]):
        found = (key, recorded)  # a component's _target_ (or the like) changed to another plain name
    if found is not None:
        raise _not_plain_error(where, found)
    expression = isinstance(own, str) and own.startswith(("$", "@", "%"))
    if expression and isinstance(recorded, dict):  # e.g. the dataset's spec: what the bundle computes
        raise InputError(
            f"{where}: '{key}' is {_short(recorded)} there, where the bundle computes it ({_short(own)}): "
            "a record may put a plain text, number, flag or list there, not a mapping"
        )
    flag_text = key in _FLAG_KEYS and isinstance(recorded, str)
    number = isinstance(own, float) and _kind(recorded) == "a whole number"
    if own is not None and not expression and not flag_text and not number and _kind(recorded) != _kind(own):
        raise InputError(
            f"{where}: '{key}' is {_short(recorded)} there, where the bundle takes {_kind(own)} "
            f"(its own: {_short(own)})"
        )
    out[key] = recorded


def _recorded_layers(study: str, run_dir: Path, recorded: Mapping[str, Any]) -> list[str]:
    """The bundle's own files a run layered on its ``train.yaml``: those its ``run.json`` command
    names, looked up in this checkout's ``bundles/<study>/configs`` (a file from elsewhere is never
    read: the record's plain values then say what it set), else the experiment and profile the
    record names."""
    configs = Path(bundle_root(study)) / "configs"
    try:
        command = json.loads((run_dir / "run.json").read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    if isinstance(command, list) and all(isinstance(a, str) for a in command):
        named = parse_command_line(command)[0]
    else:
        experiment, profile = recorded.get("experiment"), recorded.get("profile")
        named = [f"experiments/{experiment}.yaml", f"{profile}.yaml"]
    marker = f"bundles/{study}/configs/"
    tails = [f.replace("\\", "/").rpartition(marker)[2] for f in named]
    layers = []
    for tail in tails:
        own = configs / tail
        inside = own.resolve().is_relative_to(configs.resolve())
        if (
            inside
            and own.suffix == ".yaml"
            and own.is_file()
            and tail != "train.yaml"
            and own.stem not in MODES
        ):
            layers.append(f"bundles/{study}/configs/{tail}")
    return layers


def recorded_settings(
    study: str, mode: str, ckpt_path: str | Path
) -> tuple[list[str], dict[str, Any]] | None:
    """For evaluating or applying a checkpoint: the config files and overrides that rebuild the
    settings its training recorded beside it (``config.json``: dataset, class set, network,
    preprocessing, folds, as trained), or None when there is no record.

    The record is data, never code (a run folder may come from anyone): the files are the bundle's
    own (``train.yaml``, the layers the run named, the mode's layer) and the record contributes only
    the ids where it differs from them, each a plain value (text, number, flag, null, lists and
    mappings of those) of the kind the bundle's own value is. A recorded expression, reference,
    macro or ``_target_`` where the bundle's files differ, and a key they do not define, are
    refused in one line naming the id; the wiring and training-only sections are never read."""
    recorded_file = Path(ckpt_path).expanduser().resolve().parent / "config.json"
    if mode in ("evaluate", "inference"):
        check_study(ckpt_path, study)
    if mode not in ("evaluate", "inference") or not recorded_file.is_file():
        return None
    try:
        recorded = json.loads(recorded_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{recorded_file}: not a readable run record ({e})") from None
    if not isinstance(recorded, dict):
        raise InputError(f"{recorded_file}: not a run record (a mapping of settings)")
    train, layer = config_files(study)[0], config_files(study, mode)[-1]
    layers = _recorded_layers(study, recorded_file.parent, recorded)
    own_files = [str(project_root() / f) for f in (train, *layers)]  # named from the repository root
    own = json.loads(json.dumps(config_parser(own_files).get(), default=str))
    overrides: dict[str, Any] = {}
    for key, value in recorded.items():
        if key in _UNREAD:
            continue
        if key not in own:
            if (found := _not_plain(value, key)) is not None:
                raise _not_plain_error(recorded_file, found)
            raise InputError(
                f"{recorded_file}: '{key}' is not a setting of the {study} bundle "
                f"({', '.join([train, *layers])}): a run's record may only set the bundle's own settings"
            )
        _recorded_differences(value, own[key], key, recorded_file, overrides)
    return [train, *layers, layer], overrides


def meta_files(files: Sequence[str], meta_dir: str | Path | None = None) -> list[str]:
    """The bundle's ``metadata.json`` (in ``meta_dir``, default the first file's folder), then the
    ``<experiment>.meta.json`` beside each layered experiment that has one: what an experiment
    changes in the description of the inputs and outputs (e.g. FLAIR + T1: 6 input channels), so
    that MONAI's ``verify_net_in_out`` and the metadata of a run match its network."""
    configs = Path(meta_dir) if meta_dir is not None else Path(files[0]).parent
    extra = [Path(f).with_suffix(".meta.json") for f in files]
    return [
        (configs / "metadata.json").as_posix(),
        *(e.as_posix() for e in extra if (project_root() / e).is_file() or e.is_file()),
    ]


def _meta_and_logging(files: Sequence[str], meta_dir: str | Path | None) -> tuple[str | list[str], str]:
    """``--meta_file`` (one file, or the list of :func:`meta_files`) and ``--logging_file``."""
    configs = Path(meta_dir) if meta_dir is not None else Path(files[0]).parent
    metas = meta_files(files, meta_dir)
    return (metas[0] if len(metas) == 1 else metas), (configs / "logging.conf").as_posix()


def command_line(files: Sequence[str], meta_dir: str | Path | None = None, **overrides: Any) -> list[str]:
    """The ``python -m monai.bundle run`` command of ``files`` and ``overrides``, with the bundle's
    metadata (:func:`meta_files`) and logging files named explicitly (in ``meta_dir``, default the
    first file's folder)."""
    metas, logging_file = _meta_and_logging(files, meta_dir)
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "[" + ",".join(f"'{f}'" for f in files) + "]",
    ]
    args += [
        "--meta_file",
        metas if isinstance(metas, str) else "[" + ",".join(f"'{m}'" for m in metas) + "]",
        "--logging_file",
        logging_file,
    ]
    for key, value in overrides.items():
        args += [f"--{key}", _cli_value(value)]
    return args


@contextlib.contextmanager
def at_repo_root() -> Iterator[None]:
    """Work in the repository root: the studies' macros name the shared wiring relative to it."""
    old_cwd = os.getcwd()
    os.chdir(project_root())
    try:
        yield
    finally:
        os.chdir(old_cwd)


@contextlib.contextmanager
def _as_command(argv: list[str]) -> Iterator[None]:
    """Run at the repository root with ``sys.argv`` set to the equivalent command line, which the
    run record keeps (and from which it rebuilds the merged config)."""
    old_argv = sys.argv
    sys.argv = argv[2:]  # ["monai.bundle", "run", ...]
    try:
        with at_repo_root():
            yield
    finally:
        sys.argv = old_argv


def config_parser(
    files: Sequence[str], overrides: dict[str, Any] | None = None, metas: Sequence[str] | None = None
) -> Any:
    """The ``ConfigParser`` MONAI builds for ``files`` (then the metadata ``metas``, then
    ``overrides``), macros expanded from the repository root, where the studies' macros point;
    nothing is evaluated yet (``get_parsed_content`` does that)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    absolute = [str(Path(f).resolve()) for f in files]  # named from the caller's working directory
    with at_repo_root():
        parser.read_config(absolute)
        if metas:
            parser.read_meta([str(Path(m).resolve()) for m in metas])
        parser.update(dict(overrides or {}))
        parser.resolve_macro_and_relative_ids()
    return parser


# what a timed run (``run(..., stopwatch=...)``) measures per mode: the datasets filled first as
# ``cache``, the engine the run starts (resolved next, as the run itself would: MONAI's DataLoader
# reseeds torch's global stream when created, so resolving in another order, e.g. the evaluator's
# network first, would train another model than the untimed command), the engine whose runs are
# ``validation``, the handler lists holding MLflow trackers, and the phase the rest of the run is
_TIMED_PARTS = {
    "train": (
        ("train_dataset", "validate#dataset"),
        "train#trainer",
        "validate#evaluator",
        "train#handlers",
        "train",
    ),
    "evaluate": ((), "validate#evaluator", None, "validate#handlers", "evaluation"),
}


def run(
    files: Sequence[str],
    meta_dir: str | Path | None = None,
    stopwatch: Stopwatch | None = None,
    mode: str = "train",
    **overrides: Any,
) -> None:
    """Run a bundle in this process, as ``python -m monai.bundle run`` would (see :func:`command_line`):
    create the workflow (its ``initialize``), run, finalize. With a ``medseg_monai.timing.Stopwatch``
    the run's phases are timed into it: ``setup``, ``cache``, ``validation``, ``mlflow`` and the rest
    as ``train`` (``mode="train"``) or ``evaluation`` (``mode="evaluate"``)."""
    from monai.bundle import create_workflow

    metas, logging_file = _meta_and_logging(files, meta_dir)
    watch = stopwatch or Stopwatch()
    with _as_command(command_line(files, meta_dir, **overrides)):
        with watch("setup"):
            workflow = create_workflow(
                config_file=list(files), meta_file=metas, logging_file=logging_file, **overrides
            )
        if stopwatch is None:  # untimed: nothing resolved ahead of the run
            workflow.run()
            workflow.finalize()
            return
        from medseg_monai.handlers import MLflowTracker
        from medseg_monai.timing import time_engine_runs

        datasets, engine, validator, handlers, rest = _TIMED_PARTS[mode]
        parser = workflow.parser
        with watch("cache"):
            for key in datasets:
                parser.get_parsed_content(key)
        with watch("setup"):
            parser.get_parsed_content(engine)
        if validator:
            time_engine_runs(parser.get_parsed_content(validator), watch, "validation")
        validation_before = watch.seconds.get("validation", 0.0)
        start = time.perf_counter()
        workflow.run()
        workflow.finalize()
        elapsed = time.perf_counter() - start
        trackers = [h for h in parser.get_parsed_content(handlers) if isinstance(h, MLflowTracker)]
        mlflow_s = sum(t.seconds for t in trackers)
        watch.add("mlflow", mlflow_s)
        watch.add(rest, elapsed - mlflow_s - (watch.seconds.get("validation", 0.0) - validation_before))


# ----------------------------------------------------------------------------- errors


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


_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# the top-level flags the configs read through flag()
_FLAG_KEYS = ("resume", "overwrite", "fast", "allow_train_overlap")


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


def _positive_number(value: Any) -> bool:
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    return number and math.isfinite(value) and value > 0


def _check_value(key: str, value: Any) -> None:
    """Contract keys of the command line, checked before anything runs."""
    from medseg_monai.data import FOLD_POOLS, SPLITS

    counts = ("max_epochs", "val_interval", "validations_per_epoch", "batch_size", "val_batch_size")
    if key in counts and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{key} must be a positive whole number, got {value!r}")
    expression = isinstance(value, str) and value.startswith(("$", "@"))  # MONAI's syntax, checked when built
    if key == "learning_rate" and not expression and not _positive_number(value):
        raise InputError(f"learning_rate must be a positive number (e.g. 1e-3), got {value!r}")
    if key == "seed" and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"seed must be a whole number, got {value!r}")
    if key in _FLAG_KEYS:
        flag(value, key)
    if (
        key == "fold"
        and value is not None
        and (isinstance(value, bool) or not isinstance(value, int) or value < 0)
    ):
        raise InputError(f"fold must be a whole number from 0 (one fold of n_folds), got {value!r}")
    if key == "n_folds" and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise InputError(f"n_folds must be a whole number >= 2, got {value!r}")
    if key == "fold_pool" and value not in FOLD_POOLS:
        raise InputError(f"fold_pool must be one of {', '.join(FOLD_POOLS)}, got {value!r}")
    if key == "train_split" and value not in ("train", "all"):
        raise InputError(f"train_split must be train or all, got {value!r}")
    if key == "split" and value not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {value!r}")
    if key in ("dataset", "output_dir", "ckpt_path", "input_path") and not isinstance(value, str):
        raise InputError(f"{key} must be a name or path, got {value!r}")


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
    import difflib

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
        if isinstance(parser.get(key), bool) and not isinstance(value, bool) and key not in _FLAG_KEYS:
            why = " (text, which would count as true)" if isinstance(value, str) else ""
            raise InputError(
                f"{key} is true or false: write --{key} True or --{key} False, got {value!r}{why}"
            )
        _check_value(key, value)


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
    from medseg_monai.data import get_dataset
    from medseg_monai.record import device_description

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


def check_study(ckpt_path: str | Path, study: str) -> None:
    """Refuse, in one line, a checkpoint whose run record (``run.json`` beside it) says it was trained
    by another study's bundle: its network, classes and preprocessing are that bundle's, and another
    bundle's evaluation would score it as its own. A checkpoint without a record is not refused here
    (:func:`check_checkpoint` still checks its tensors against the network)."""
    record = Path(ckpt_path).expanduser().resolve().parent / "run.json"
    try:
        trained = json.loads(record.read_text()).get("study")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(trained, str) and study != "<study>" and trained != study:
        raise InputError(
            f"checkpoint {ckpt_path} was trained by the {trained} bundle ({record}), not {study}: "
            f"python -m medseg_monai.bundle {trained} --mode evaluate|inference --ckpt_path {ckpt_path}"
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
    from medseg_monai.errors import OneLineInputErrorFormatter

    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, OneLineInputErrorFormatter):
            fmt = handler.formatter
            handler.setFormatter(
                OneLineInputErrorFormatter(fmt._fmt if fmt else None, fmt.datefmt if fmt else None)
            )
    summary = logging.getLogger("monai.bundle.scripts")
    if not any(isinstance(f, _InputSummary) for f in summary.filters):
        summary.addFilter(_InputSummary())


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file, else a one-line ``InputError`` naming ``what`` it should be."""
    if not Path(path).is_file():
        raise InputError(f"{what} not found: {path}")
    return path


def image_files(
    path: str, suffixes: Sequence[str] = (".png",), spatial_dims: int | None = None, grey: bool = False
) -> list[dict[str, str]]:
    """Inference inputs: one file, or every file with one of ``suffixes`` in a folder, as
    ``{"image": path, "case_id": name}`` dicts (the name without its suffixes); for a volume
    (``spatial_dims`` 3), a folder of one DICOM series is one case (``medseg_monai.dicom``).
    Each file is checked
    before the engine starts (readable; a NIfTI of ``spatial_dims`` dimensions), so a bad one is
    refused in one line naming it rather than failing inside the evaluator's run; with ``grey``, a
    colour picture (RGB, RGBA, ...) too."""
    from medseg_monai.dicom import is_dicom_series_folder, series_case
    from medseg_monai.transforms import CheckFilesd  # torch and MONAI: not at the launcher's import

    p = Path(path).expanduser().resolve()
    if spatial_dims == 3 and is_dicom_series_folder(p):  # a DICOM series' folder: one volume, read by ITK
        return [series_case(p, spatial_dims)]
    files = sorted(f for f in p.iterdir() if f.name.lower().endswith(tuple(suffixes))) if p.is_dir() else [p]
    if not files or not files[0].is_file():
        raise DatasetError(f"no input image at {p} (expected a file or a folder of {', '.join(suffixes)})")
    items = [{"image": str(f), "case_id": f.name.split(".")[0]} for f in files]
    check = CheckFilesd("image", spatial_dims=spatial_dims, grey_keys="image" if grey else ())
    for item in items:
        check(item)
    return items


def channel_cases(path: str | Sequence[str], dataset: str, channels: Sequence[str]) -> list[dict[str, Any]]:
    """Multi-channel inference inputs as ``{"image": [one path per channel], "case_id": ..., <channel>:
    path, ...}`` (the registry's datalist shape):

    - one case as a list of files, one per channel in ``channels`` order (on the command line a
      comma-separated string);
    - a case folder, or a folder of case folders: in each, the file of channel ``c`` is the one
      whose name ends as the file of ``c`` does in ``dataset``'s layout (``_t1ce.nii.gz`` in
      BraTS 2018, ``T1c_subtrMeanDivStd.nii.gz`` in the BRATS 2015 files).

    A case folder that lacks a channel stops with one line naming the folder and the channel.
    """
    from medseg_monai.data import get_dataset

    files = [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path).split(",")
    if len(files) > 1:
        if len(files) != len(channels):
            raise DatasetError(
                f"one case needs {len(channels)} files ({', '.join(channels)}), got {len(files)}"
            )
        for f in files:
            if not Path(f).expanduser().is_file():
                raise DatasetError(f"no input image at {Path(f).expanduser().resolve()}")
        paths = [str(Path(f).expanduser().absolute()) for f in files]
        return [
            {
                "image": paths,
                "case_id": Path(files[0]).name.split(".")[0],
                **dict(zip(channels, paths, strict=True)),
            }
        ]
    layout = get_dataset(dataset).layout["images"]
    tails = {c: Path(layout[c]).name.rsplit("}", 1)[-1].lower() for c in channels}
    root = Path(files[0]).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"{root}: give a case folder, a folder of case folders, or {len(channels)} files ({', '.join(channels)})"
        )

    def match(folder: Path) -> dict[str, list[Path]]:
        names = sorted(p for p in folder.iterdir() if p.is_file())
        return {c: [p for p in names if p.name.lower().endswith(t)] for c, t in tails.items()}

    own = match(root)
    folders = [root] if any(own.values()) else sorted(p for p in root.iterdir() if p.is_dir())
    cases = []
    for folder in folders:
        found = own if folder == root else match(folder)
        if not any(found.values()):
            continue
        for c, hits in found.items():
            if len(hits) != 1:
                what = "no file" if not hits else f"{len(hits)} files"
                raise DatasetError(
                    f"case folder {folder}: {what} for channel '{c}' (a name ending '{tails[c]}')"
                )
        paths = [str(found[c][0]) for c in channels]
        cases.append({"image": paths, "case_id": folder.name, **dict(zip(channels, paths, strict=True))})
    if not cases:
        raise DatasetError(f"no case under {root}: no file name ends as {', '.join(tails.values())}")
    return cases


# ----------------------------------------------------------------------------- engine helpers


def default_device() -> Any:
    """``cuda:<LOCAL_RANK>`` under torchrun, ``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


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


def _rank0_only() -> tuple[type, ...]:
    from ignite.handlers import ProgressBar
    from monai.handlers import CheckpointSaver, StatsHandler

    from medseg_monai.handlers import LesionTableWriter, MLflowTracker, ProgressLog
    from medseg_monai.visualize import OverlaySaver

    return (
        MLflowTracker,
        StatsHandler,
        CheckpointSaver,
        LesionTableWriter,
        OverlaySaver,
        ProgressLog,
        ProgressBar,
    )


def for_this_rank(handlers: Sequence[Any]) -> list[Any]:
    """``handlers`` without those that log, track or write files on ranks > 0 of a DDP run; the
    others (validation, LR stepping, per-case metrics, which gather across ranks) stay on every rank."""
    handlers = [h for h in handlers if h is not None]
    if _rank() == 0:
        return handlers
    return [h for h in handlers if not isinstance(h, _rank0_only())]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medseg_monai.bundle", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("study")
    parser.add_argument("--mode", default="train", choices=MODES)
    parser.add_argument("--experiment")
    parser.add_argument("--profile")
    parser.add_argument("--dry_run", action="store_true", help="print the equivalent monai.bundle command")
    args, rest = parser.parse_known_args(argv)
    try:
        files = config_files(args.study, args.mode, args.experiment, args.profile)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, _, overrides = parse_command_line(["run", *rest])
    meta_dir = Path(files[0]).parent
    try:
        recorded = None
        if "ckpt_path" in overrides and not (args.experiment or args.profile):
            recorded = recorded_settings(args.study, args.mode, str(overrides["ckpt_path"]))
        if recorded is not None:  # the checkpoint's own run says how it was trained
            files, settings = recorded
            overrides = {**settings, **overrides}  # the command line wins
            where = Path(str(overrides["ckpt_path"])).expanduser().resolve().parent / "config.json"
            shown = ", ".join(f"{k}={_short(v)}" for k, v in settings.items()) or "none"
            print(
                f"using the settings the checkpoint was trained with: {where} (bundle files "
                f"{', '.join(files)}; recorded settings {shown})",
                file=sys.stderr,
            )
        if args.mode in ("evaluate", "inference") and "ckpt_path" in overrides:
            # results beside the checkpoint, unless told otherwise (never the folder a record names)
            folder = Path(str(overrides["ckpt_path"])).expanduser().resolve().parent
            overrides.setdefault("output_dir", str(folder))
        with at_repo_root():
            check_command_line(command_line(files, meta_dir, **overrides)[2:])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        import shlex

        print(shlex.join(command_line(files, meta_dir, **overrides)))
        return 0
    install_error_hook()
    run(files, meta_dir, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
