"""Config parsing and the merged config of a bundle run: where a study's files are, the
``--config_file`` list and ``monai.bundle run`` command of a run, MONAI's ``ConfigParser`` of it,
the default output folder and MLflow run name, and a run's record read back as plain settings.

The bottom layer of the launcher: it imports nothing of the suite but ``errors`` and ``paths`` (and,
when a run name needs it, the dataset registry), so the run record, the runtime helpers and the
launcher build on it, and importing it is quick.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg_monai.errors import InputError
from medseg_monai.paths import project_root

__all__ = [
    "FLAG_KEYS",
    "MODES",
    "at_repo_root",
    "bundle_root",
    "check_study",
    "command_line",
    "config_files",
    "config_parser",
    "default_output_dir",
    "meta_files",
    "meta_and_logging",
    "not_plain",
    "parse_command_line",
    "recorded_settings",
    "run_name",
    "shortened",
    "studies",
    "fits_kind",
    "value_kind",
]

MODES = ("train", "evaluate", "inference", "multi_gpu_train")
# the top-level flags the configs read through medseg_monai.runtime.flag (text such as 'false' allowed)
FLAG_KEYS = ("resume", "overwrite", "fast", "allow_train_overlap")


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
    # lazy: medseg_monai.data imports torch and MONAI (seconds), which parsing a config does not need
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


# ----------------------------------------------------------------------------- the config files


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
    if study not in (names := studies(base)):  # a name, never a path (run.json's study may come from anyone)
        raise InputError(f"unknown study {study!r} (studies: {', '.join(names)})")
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
        if f.is_file():
            continue
        if f.parent.name == "experiments":
            known = sorted(p.stem for p in f.parent.glob("*.yaml"))
            raise InputError(f"no config {name} (experiments of {study}: {', '.join(known) or 'none'})")
        if f.name == f"{profile}.yaml":
            raise InputError(f"no config {name} (profiles: paper, quick)")
        raise InputError(f"no config {name} (studies: {', '.join(names)})")
    return named


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


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


def meta_and_logging(files: Sequence[str], meta_dir: str | Path | None) -> tuple[str | list[str], str]:
    """``--meta_file`` (one file, or the list of :func:`meta_files`) and ``--logging_file``."""
    configs = Path(meta_dir) if meta_dir is not None else Path(files[0]).parent
    metas = meta_files(files, meta_dir)
    return (metas[0] if len(metas) == 1 else metas), (configs / "logging.conf").as_posix()


def command_line(files: Sequence[str], meta_dir: str | Path | None = None, **overrides: Any) -> list[str]:
    """The ``python -m monai.bundle run`` command of ``files`` and ``overrides``, with the bundle's
    metadata (:func:`meta_files`) and logging files named explicitly (in ``meta_dir``, default the
    first file's folder)."""
    metas, logging_file = meta_and_logging(files, meta_dir)
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


# ----------------------------------------------------------------------------- the command line


def parse_command_line(argv: Sequence[str]) -> tuple[list[str], list[str], dict[str, Any]]:
    """Config files, meta files and overrides of a ``monai.bundle run`` command line (``--k v`` pairs,
    values read as Python literals where they are one, as MONAI's CLI does)."""
    files: list[str] = []
    metas: list[str] = []
    overrides: dict[str, Any] = {}
    args = list(argv)
    i = args.index("run") + 1 if "run" in args else 1
    while i < len(args):
        key = args[i]
        if not key.startswith("--"):
            i += 1
            continue
        key, eq, value = key[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else "True"
            i += 1
        i += 1
        try:
            parsed: Any = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if key == "config_file":
            files = [
                str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else str(parsed).split(","))
            ]
        elif key == "meta_file":
            metas = [str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]
        elif key not in ("logging_file", "args_file", "tracking", "run_id", "init_id", "final_id"):
            overrides[key] = parsed
    return files, metas, overrides


# ----------------------------------------------------------------------------- a run's record, read as data


# from the bundle's own files, so nothing written there can reach the evaluation; output_dir is where
# the run was, not how it trained (a copied folder's record names the original)
_UNREAD = (
    "_meta_", "imports", "initialize", "run", "finalize", "train", "validate", "infer", "device", "amp",
    "network", "loss", "optimizer", "lr_scheduler", "output_dir",
)  # fmt: skip
_SPECIAL_KEY = re.compile(r"_[a-z]+_")  # MONAI's _target_, _requires_, _disabled_, _mode_, _desc_


def not_plain(value: Any, key: str) -> tuple[str, Any] | None:
    """The first id under ``key`` (``key``, ``key#i``, ...) whose value MONAI would not take as written:
    an expression (``$``, run with ``eval``), a reference (``@``), a macro (``%``, which reads another
    file) or a special key such as ``_target_`` (a component to build); None for plain data."""
    if isinstance(value, str):
        return (key, value) if value.startswith(("$", "@", "%")) else None
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if isinstance(value, list):
        return next((f for i, v in enumerate(value) if (f := not_plain(v, f"{key}#{i}"))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or _SPECIAL_KEY.fullmatch(k):
                return (f"{key}#{k}", v)
            if found := not_plain(v, f"{key}#{k}"):
                return found
        return None
    return (key, value)


def value_kind(value: Any) -> str:
    """What kind of plain value ``value`` is, in words (a setting's messages say what it takes)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    return {float: "a number", str: "a text", list: "a list", dict: "a mapping"}.get(type(value), "null")


def fits_kind(value: Any, own: Any) -> bool:
    """Whether ``value`` may replace the bundle's own value ``own`` of a setting: of its kind (a whole
    number also where a number is), or anything where the bundle leaves the setting null or computes
    it (an expression, reference or macro)."""
    if own is None or isinstance(own, str) and own.startswith(("$", "@", "%")):
        return True
    takes, given = value_kind(own), value_kind(value)
    return given == takes or (takes == "a number" and given == "a whole number")


def shortened(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _not_plain_error(where: Path, found: tuple[str, Any]) -> InputError:
    return InputError(
        f"{where}: '{found[0]}' holds {shortened(found[1])}, which MONAI would run or build: a run's "
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
    found = not_plain(recorded, key)
    if found is None and _SPECIAL_KEY.fullmatch(key.rpartition("#")[2]):
        found = (key, recorded)  # a component's _target_ (or the like) changed to another plain name
    if found is not None:
        raise _not_plain_error(where, found)
    expression = isinstance(own, str) and own.startswith(("$", "@", "%"))
    if expression and isinstance(recorded, dict):  # e.g. the dataset's spec: what the bundle computes
        raise InputError(
            f"{where}: '{key}' is {shortened(recorded)} there, where the bundle computes it ({shortened(own)}): "
            "a record may put a plain text, number, flag or list there, not a mapping"
        )
    flag_text = key in FLAG_KEYS and isinstance(recorded, str)
    if not flag_text and not fits_kind(recorded, own):
        raise InputError(
            f"{where}: '{key}' is {shortened(recorded)} there, where the bundle takes {value_kind(own)} "
            f"(its own: {shortened(own)})"
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
            if (found := not_plain(value, key)) is not None:
                raise _not_plain_error(recorded_file, found)
            raise InputError(
                f"{recorded_file}: '{key}' is not a setting of the {study} bundle "
                f"({', '.join([train, *layers])}): a run's record may only set the bundle's own settings"
            )
        _recorded_differences(value, own[key], key, recorded_file, overrides)
    return [train, *layers, layer], overrides


def check_study(ckpt_path: str | Path, study: str) -> None:
    """Refuse, in one line, a checkpoint whose run record (``run.json`` beside it) says it was trained
    by another study's bundle: its network, classes and preprocessing are that bundle's, and another
    bundle's evaluation would score it as its own. A checkpoint without a record is not refused here
    (``medseg_monai.runtime.check_checkpoint`` still checks its tensors against the network)."""
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
