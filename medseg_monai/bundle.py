"""Run a study's bundle by name, as python -m monai.bundle run would run its files.

The launcher builds the config-file list of a (study, mode, experiment, profile) (``medseg_monai.config``),
checks the command line before anything loads, reads a checkpoint's own settings back from its run
record, and runs the bundle with its ``metadata.json`` and ``logging.conf`` named explicitly;
reproduce, bench and the tests go through it. What the configs call at run time is in
``medseg_monai.runtime``.

    python -m medseg_monai.bundle <study> [--mode train|evaluate|inference|multi_gpu_train]
        [--experiment NAME] [--profile quick] [--dry_run] [--key value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medseg_monai import config, runtime
from medseg_monai.deprecation import moved_names
from medseg_monai.errors import InputError
from medseg_monai.handlers import MLflowTracker
from medseg_monai.timing import Stopwatch, time_engine_runs

__all__ = ["main", "run", "settings"]


@contextlib.contextmanager
def _as_command(argv: list[str]) -> Iterator[None]:
    """Run at the repository root with ``sys.argv`` set to the equivalent command line, which the
    run record keeps (and from which it rebuilds the merged config)."""
    old_argv = sys.argv
    sys.argv = argv[2:]  # ["monai.bundle", "run", ...]
    try:
        with config.at_repo_root():
            yield
    finally:
        sys.argv = old_argv


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
    """Run a bundle in this process, as ``python -m monai.bundle run`` would (see
    ``medseg_monai.config.command_line``): create the workflow (its ``initialize``), run, finalize. With a ``medseg_monai.timing.Stopwatch``
    the run's phases are timed into it: ``setup``, ``cache``, ``validation``, ``mlflow`` and the rest
    as ``train`` (``mode="train"``) or ``evaluation`` (``mode="evaluate"``)."""
    from monai.bundle import create_workflow

    metas, logging_file = config.meta_and_logging(files, meta_dir)
    watch = stopwatch or Stopwatch()
    with _as_command(config.command_line(files, meta_dir, **overrides)):
        with watch("setup"):
            workflow = create_workflow(
                config_file=list(files), meta_file=metas, logging_file=logging_file, **overrides
            )
        if stopwatch is None:  # untimed: nothing resolved ahead of the run
            workflow.run()
            workflow.finalize()
            return
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


# ----------------------------------------------------------------------------- the settings a user can give

# the layers whose top-level keys a command line may set, by launcher mode (multi_gpu_train: train's)
_SETTING_MODES = ("train", "evaluate", "inference")
# what the launcher's own arguments set: the positional study, --experiment and --profile
_LAUNCHER_KEYS = ("study", "experiment", "profile")


@functools.cache
def _study_settings(study: str, mode: str) -> dict[str, Any]:
    """The top-level keys of ``study``'s configs in ``mode`` that a command line sets (``--key
    value``), with their raw defaults: the contract keys the launcher checks
    (``medseg_monai.runtime.CONTRACT_KEYS``) and every other key holding plain data, not the wiring's
    sections, components or computed values."""
    raw = config.config_parser(config.config_files(study, mode)).get()
    return {
        key: value
        for key, value in raw.items()
        if key not in _LAUNCHER_KEYS
        and not key.startswith("_")  # MONAI's _meta_ and the like
        and (key in runtime.CONTRACT_KEYS or config.not_plain(value, key) is None)
    }


def settings(study: str | None = None, mode: str | None = None) -> dict[str, tuple[str, ...]]:
    """Every setting a user can give on the command line, by name, with the modes that take it:
    ``study``'s in ``mode`` (default: each mode), or with no study the settings every study takes."""
    names = [study] if study else config.studies()
    modes = [mode if mode in _SETTING_MODES else "train"] if mode else list(_SETTING_MODES)
    found: dict[str, tuple[str, ...]] = {}
    for m in modes:
        common = set.intersection(*(set(_study_settings(s, m)) for s in names))
        for key in sorted(common):
            found[key] = (*found.get(key, ()), m)
    return found


def _as_yaml(value: Any) -> str:
    """A default as a config file writes it (``default``, ``1.0``, ``null``, ``[8, 16]``), cut short."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 50 else text[:47] + "..."


def _settings_help(study: str | None, mode: str | None) -> str:
    """The settings section of ``--help``: each setting, what it takes (the checked ones) or its
    default (the same in every study listed, else "per study"), and the modes that take it."""
    lines = []
    for key, modes in settings(study, mode).items():
        studies = [study] if study else config.studies()
        defaults = {_as_yaml(_study_settings(s, m)[key]) for s in studies for m in modes}
        if key in runtime.CONTRACT_KEYS:
            what = runtime.CONTRACT_KEYS[key][0]
        else:
            what = f"default {defaults.pop()}" if len(defaults) == 1 else "default per study"
        only = "" if len(modes) == len(_SETTING_MODES) or mode else f" ({', '.join(modes)} only)"
        lines.append(f"  --{key:<24}{what}{only}")
    whose = f"the {study} bundle" if study else "every study"
    more = "" if study else "\n(python -m medseg_monai.bundle <study> --help lists a study's own)"
    heading = f"settings of {whose} (--key value; --key#sub value reaches inside a section):"
    return "\n".join([heading, *lines]) + more


# ----------------------------------------------------------------------------- the command


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m medseg_monai.bundle", description=__doc__.split("\n\n")[0], add_help=False
    )
    parser.add_argument("study", nargs="?", help=f"one of {', '.join(config.studies())}")
    parser.add_argument(
        "--mode", choices=config.MODES, help="train (the default), evaluate, inference or multi_gpu_train"
    )
    parser.add_argument("--experiment", help="configs/experiments/<NAME>.yaml layered on train.yaml")
    parser.add_argument(
        "--profile", help="configs/<PROFILE>.yaml layered after it, e.g. quick (tiny CPU run)"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the equivalent monai.bundle command")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the settings")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _argument_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        try:
            if args.study:
                config.config_files(args.study, args.mode or "train")  # an unknown study: one line
            text = _settings_help(args.study, args.mode)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(parser.format_help() + "\n" + text)
        return 0
    if args.study is None:
        parser.error("the following arguments are required: study")
    args.mode = args.mode or "train"
    try:
        files = config.config_files(args.study, args.mode, args.experiment, args.profile)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, _, overrides = config.parse_command_line(["run", *rest])
    meta_dir = Path(files[0]).parent
    try:
        recorded = None
        if "ckpt_path" in overrides and not (args.experiment or args.profile):
            recorded = config.recorded_settings(args.study, args.mode, str(overrides["ckpt_path"]))
        if recorded is not None:  # the checkpoint's own run says how it was trained
            files, own = recorded
            overrides = {**own, **overrides}  # the command line wins
            where = Path(str(overrides["ckpt_path"])).expanduser().resolve().parent / "config.json"
            shown = ", ".join(f"{k}={config.shortened(v)}" for k, v in own.items()) or "none"
            print(
                f"using the settings the checkpoint was trained with: {where} (bundle files "
                f"{', '.join(files)}; recorded settings {shown})",
                file=sys.stderr,
            )
        if args.mode in ("evaluate", "inference") and "ckpt_path" in overrides:
            # results beside the checkpoint, unless told otherwise (never the folder a record names)
            folder = Path(str(overrides["ckpt_path"])).expanduser().resolve().parent
            overrides.setdefault("output_dir", str(folder))
        with config.at_repo_root():
            runtime.check_command_line(config.command_line(files, meta_dir, **overrides)[2:])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(config.command_line(files, meta_dir, **overrides)))
        return 0
    runtime.install_error_hook()
    run(files, meta_dir, **overrides)
    return 0


# ----------------------------------------------------------------------------- old paths, one release

# ``medseg_monai.bundle.<name>`` held the config layer, the runtime helpers and the inference inputs
# until #38 split them out: configs written for it keep working for one release, with a warning
__getattr__ = moved_names(
    __name__,
    {
        **{name: "medseg_monai.config" for name in config.__all__},
        **{name: "medseg_monai.runtime" for name in runtime.__all__},
        **{name: "medseg_monai.data.inputs" for name in ("channel_cases", "image_files", "require_file")},
    },
)


if __name__ == "__main__":
    sys.exit(main())
