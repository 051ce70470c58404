"""Cases on disk -> MONAI data dicts, deterministic patient-grouped splits, Decathlon datalists.

A layout pattern such as ``{site}/{subject:[0-9]+}/pre/FLAIR.nii.gz`` is a path relative to
the dataset root whose ``{name}`` placeholders (optionally ``{name:regex}``) identify a case;
the other patterns of the entry are filled with the captured values.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from medseg_monai.data.registry import DatasetError, DatasetSpec, get_dataset, list_datasets
from medseg_monai.io import write_json
from medseg_monai.paths import cache_dir, data_root_env

__all__ = [
    "SPLITS",
    "decathlon_doc",
    "default_dataset",
    "find_cases",
    "load_datalist",
    "likely_datasets",
    "load_splits",
    "resolve_data_root",
    "resolve_data_roots",
    "split_cases",
    "take",
    "select_split",
    "training_cases",
    "validation_cases",
    "write_datalist",
    "write_json",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)(?::([^{}]+))?\}")
_MARKER = ".medseg-synthetic.json"


def _pattern_regex(pattern: str) -> tuple[str, re.Pattern[str]]:
    """A layout pattern as a glob (placeholders -> ``*``) and an anchored regex with named groups."""
    seen: set[str] = set()
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        name, rx = m.group(1), m.group(2)
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{rx or '[^/]+'})")
        seen.add(name)
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return _PLACEHOLDER.sub("*", pattern), re.compile("".join(parts))


def _fill(template: str, fields: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], template)


def _escapes(relative: str) -> bool:
    """Whether a filled layout path leaves the data root: absolute, or with a ``..`` segment (the
    schema refuses ``../`` in a pattern, but an empty placeholder, as in ``.{x}./``, or a captured
    value can still make one; a ``..`` after a linked folder would leave it however it normalises)."""
    path = PurePosixPath(relative)
    return path.is_absolute() or ".." in path.parts


def _case_files(spec: DatasetSpec, root: Path) -> Any:
    """Paths under ``root`` that match the layout's case pattern."""
    glob, rx = _pattern_regex(spec.layout["case"])
    for p in root.glob(glob):
        relative = p.relative_to(root).as_posix()
        if rx.fullmatch(relative) and not _escapes(relative):
            yield p


def find_cases(spec: DatasetSpec, root: Path, channels: list[str] | None = None) -> list[dict[str, Any]]:
    """Every case under ``root`` as a data dict, sorted by case id.

    Keys: ``case_id``, ``group`` (patient), ``image`` (list of paths, one per channel),
    one key per channel, ``label`` (label-map path, or list of mask paths in
    ``spec.mask_names`` order), any ``extra`` files and, where the layout names ``phases``, the
    case's ``phase`` (e.g. ED or ES). Missing files raise ``DatasetError``.
    """
    layout = spec.layout
    channels = channels or spec.channels
    unknown = [c for c in channels if c not in layout["images"]]
    if unknown:
        raise DatasetError(
            f"dataset '{spec.id}' has no channel {', '.join(unknown)} (channels: {', '.join(spec.channels)})"
        )
    glob, rx = _pattern_regex(layout["case"])
    names = [m.group(1) for m in _PLACEHOLDER.finditer(layout["case"])]
    id_template = layout.get("case_id", "_".join(f"{{{n}}}" for n in dict.fromkeys(names)))
    cases: dict[str, dict[str, Any]] = {}
    for anchor in sorted(root.glob(glob)):
        m = rx.fullmatch(anchor.relative_to(root).as_posix())
        if m is None or _escapes(anchor.relative_to(root).as_posix()):
            continue
        fields = m.groupdict()
        case_id = _fill(id_template, fields)

        def path(pattern: str, what: str, case_id: str = case_id, fields: dict[str, str] = fields) -> str:
            relative = _fill(pattern, fields)
            if _escapes(relative):
                raise DatasetError(
                    f"dataset '{spec.id}': case '{case_id}': its {what} {relative!r} (layout "
                    f"{pattern!r}) leads outside its data root {root}: refused"
                )
            p = root / relative
            if not p.is_file():
                raise DatasetError(f"dataset '{spec.id}': case '{case_id}' is missing its {what}: {p}")
            return str(p)

        item: dict[str, Any] = {"case_id": case_id, "group": _fill(layout.get("group", id_template), fields)}
        item.update({c: path(layout["images"][c], f"'{c}' image") for c in channels})
        item["image"] = [item[c] for c in channels]
        if "label" in layout:
            item["label"] = path(layout["label"], "label")
        else:
            item["label"] = [path(p, f"'{s}' mask") for s, p in layout["masks"].items()]
        item.update({k: path(p, f"'{k}' file") for k, p in layout.get("extra", {}).items()})
        if case_id in cases:
            raise DatasetError(
                f"dataset '{spec.id}': duplicate case id '{case_id}' ({cases[case_id]['image'][0]} and {anchor})"
            )
        cases[case_id] = item
    if not cases:
        likely = likely_datasets(root, exclude=spec.id) if not spec.synthetic else []
        hint = (
            f"; it looks like {' or '.join(repr(i) for i in likely)}: pass --dataset {likely[0]}"
            if likely
            else ""
        )
        raise DatasetError(
            f"dataset '{spec.id}': no case found under {root} matching '{layout['case']}'{hint}"
        )
    items = [cases[k] for k in sorted(cases)]
    if "phases" in layout:
        _assign_phases(spec, root, items, layout["phases"])
    return items


def _assign_phases(spec: DatasetSpec, root: Path, items: list[dict[str, Any]], phases: list[str]) -> None:
    """Give each case its ``phase``: a patient's cases in case-id order are ``phases`` (ACDC labels
    two frames of each patient, end-diastole first). A patient with another number of cases has no
    phase to read, and a per-phase figure from it would be wrong: refused, naming the patient."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item["group"], []).append(item)
    for group, members in groups.items():
        if len(members) != len(phases):
            raise DatasetError(
                f"dataset '{spec.id}': patient '{group}' under {root} has {len(members)} case(s) "
                f"({', '.join(m['case_id'] for m in members)}); each needs one per phase ({', '.join(phases)})"
            )
        for member, phase in zip(members, phases, strict=True):
            member["phase"] = phase


def split_cases(
    items: list[dict[str, Any]], fractions: list[float], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic train/val/test split that keeps every patient (``group``) in one part.

    Groups are shuffled with ``seed``; val and test get ``round(fraction * n_groups)`` groups,
    at least one each when their fraction is positive and a training group remains.
    """
    groups = sorted({it["group"] for it in items})
    random.Random(seed).shuffle(groups)
    n = len(groups)
    counts = []
    for frac in fractions[1:]:
        k = round(frac * n)
        if frac > 0 and k == 0 and n - sum(counts) >= 2:
            k = 1
        counts.append(min(k, n - sum(counts) - 1))
    n_val, n_test = counts
    part = {g: "test" for g in groups[:n_test]}
    part.update({g: "val" for g in groups[n_test : n_test + n_val]})
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for it in items:
        out[part.get(it["group"], "train")].append(it)
    return out


def take(items: list[dict[str, Any]], n: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` cases of a seeded permutation of ``items`` (all when ``n`` is None or larger,
    said in a warning: a size sweep on a smaller data set): for a fixed seed, smaller subsets are
    nested in larger ones, as a training-size sweep needs."""
    if n is not None and n > len(items):
        logger.warning(
            "train_size %d is more than the %d training cases: all %d train", n, len(items), len(items)
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[: len(items) if n is None else n])]


def _params_hash(spec: DatasetSpec) -> str:
    """Hash of the generator's name, seed, parameters (with defaults) and source code, so that a
    change to any of them generates the dataset anew instead of reusing a stale cache."""
    from medseg_monai import synthetic  # lazy: the generators import nibabel/PIL, a device may lack them

    gen = dict(spec.generator or {})
    gen.pop("expected_fractions", None)
    gen["params"] = {**synthetic.default_params(gen["name"]), **gen["params"]}
    code = inspect.getsource(inspect.getmodule(synthetic.GENERATORS[gen["name"]])) + inspect.getsource(
        synthetic._common
    )
    digest = hashlib.sha256(json.dumps(gen, sort_keys=True).encode() + code.encode())
    return digest.hexdigest()[:10]


def _ensure_synthetic(spec: DatasetSpec, root: Path) -> None:
    """Generate ``spec`` into ``root`` unless it already holds data (atomic: temp dir + rename)."""
    from medseg_monai import synthetic  # lazy: the generators import nibabel/PIL, a device may lack them

    if (root / _MARKER).is_file() or (root.is_dir() and any(root.iterdir())):
        return
    gen = spec.generator or {}
    logger.info("dataset '%s' is synthetic: generating it into %s (first use, deterministic)", spec.id, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        synthetic.generate(gen["name"], tmp, seed=gen["seed"], params=gen["params"])
        (tmp / _MARKER).write_text(json.dumps({"id": spec.id, "generator": gen}, indent=1))
        if root.is_dir():
            root.rmdir()  # empty (checked above); another process may have won the race
        os.rename(tmp, root)
    except OSError:
        if not (root / _MARKER).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def likely_datasets(root: Path, exclude: str = "") -> list[str]:
    """The real datasets whose layout finds cases under ``root`` (what a folder probably holds)."""
    found = []
    for dataset_id in list_datasets():
        spec = get_dataset(dataset_id)
        if spec.synthetic or dataset_id == exclude:
            continue
        if any(True for _ in _case_files(spec, root)):
            found.append(dataset_id)
    return found


def _not_this_dataset(spec: DatasetSpec, root: Path, what: str) -> DatasetError:
    likely = likely_datasets(root, exclude=spec.id)
    hint = (
        f"it looks like {' or '.join(repr(i) for i in likely)}: pass --dataset {likely[0]}"
        if likely
        else (
            f"pass the --dataset its files are, or a data_root laid out as '{spec.id}' ({spec.layout['case']})"
        )
    )
    return DatasetError(f"data_root {root} {what} for dataset '{spec.id}': {hint}")


def resolve_data_root(dataset_id: str, data_root: str | Path | None = None) -> Path:
    """Where ``dataset_id``'s files are: ``data_root``, else ``$MEDSEG_DATA_ROOT/<id>``; synthetic
    datasets default to ``$MEDSEG_CACHE/synthetic/<id>-<params hash>`` and are generated on first use."""
    spec = get_dataset(dataset_id)
    if data_root is None and spec.synthetic:
        root = cache_dir() / "synthetic" / f"{spec.id}-{_params_hash(spec)}"
    elif data_root is None:
        env = data_root_env()
        if env is None:
            raise DatasetError(
                f"dataset '{spec.id}' is real and no data root is set: pass data_root or set MEDSEG_DATA_ROOT "
                f"to the folder holding {spec.id}/. Get it from {spec.obtain['url']}: {spec.obtain['instructions']}"
            )
        root = env / spec.id
    else:
        root = Path(data_root).expanduser().resolve()
    if spec.synthetic and data_root is not None and root.is_dir() and any(root.iterdir()):
        # a folder given for a synthetic dataset must be that generator's output, not real data
        marker = root / _MARKER
        if not marker.is_file():
            raise _not_this_dataset(spec, root, f"holds no generated data ({_MARKER} is missing)")
        made = json.loads(marker.read_text()).get("id")
        if made != spec.id:
            raise DatasetError(
                f"data_root {root} holds synthetic '{made}', not '{spec.id}': pass --dataset {made}"
            )
    if spec.synthetic:
        _ensure_synthetic(spec, root)
    elif not root.is_dir():
        raise DatasetError(
            f"dataset '{spec.id}': data root {root} does not exist. "
            f"Get it from {spec.obtain['url']}: {spec.obtain['instructions']}"
        )
    return root


def resolve_data_roots(
    requests: list[tuple[str, str | Path | None]], workers: int = 1
) -> list[Path | DatasetError]:
    """:func:`resolve_data_root` of each (dataset id, data root), in up to ``workers`` forked
    processes at once: the synthetic datasets not yet generated are generated side by side (the five
    take 25 s one after another, WMH's 10 s of it). Each answer is the root or the error it raised."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1 or len(requests) <= 1:
        return [_resolve_or_error(r) for r in requests]
    context = multiprocessing.get_context("fork")  # no re-import: the generators need numpy and scipy only
    with ProcessPoolExecutor(min(workers, len(requests)), mp_context=context) as pool:
        return list(pool.map(_resolve_or_error, requests))


def _resolve_or_error(request: tuple[str, str | Path | None]) -> Path | DatasetError:
    try:
        return resolve_data_root(*request)
    except DatasetError as e:
        return e


def load_splits(
    dataset_id: str,
    data_root: str | Path | None = None,
    seed: int | None = None,
    channels: list[str] | None = None,
    fold: int | None = None,
    n_folds: int = 5,
    fold_pool: str = "train_val",
) -> dict[str, list[dict[str, Any]]]:
    """All cases of ``dataset_id`` split into ``train``/``val``/``test`` in one scan of its files
    (arguments as in :func:`load_datalist`); with ``fold``, ``train`` and ``val`` are that fold of
    :func:`fold_cases` over ``fold_pool``."""
    spec = get_dataset(dataset_id)
    seed = spec.split["seed"] if seed is None else seed
    items = find_cases(spec, resolve_data_root(dataset_id, data_root), channels)
    return fold_cases(split_cases(items, spec.split["fractions"], seed), fold, n_folds, seed, fold_pool)


FOLD_POOLS = ("train_val", "all")


def fold_cases(
    parts: dict[str, list[dict[str, Any]]],
    fold: int | None,
    n_folds: int = 5,
    seed: int = 0,
    pool: str = "train_val",
) -> dict[str, list[dict[str, Any]]]:
    """Fold ``fold`` of a k-fold cross-validation grouped by patient: the groups of the pool are
    shuffled with ``seed`` and dealt round-robin into ``n_folds`` folds; fold ``fold`` validates,
    the others train. ``pool`` ``train_val`` deals the ``train`` and ``val`` cases and leaves
    ``test`` untouched (it never takes part in model selection); ``all`` deals every case, test
    included, and leaves ``test`` empty: how a small real sample is cross-validated, so that every
    case is scored once by a model that never saw it. ``fold=None`` returns ``parts`` as they are.

    Kayalibay et al. chose their best network by 5-fold cross-validation on the training cases.
    """
    if pool not in FOLD_POOLS:
        raise DatasetError(f"fold_pool must be one of {', '.join(FOLD_POOLS)}, got {pool!r}")
    if fold is None:
        return parts
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise DatasetError(f"n_folds must be a whole number >= 2, got {n_folds!r}")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise DatasetError(
            f"fold must be a whole number from 0 to {n_folds - 1} (n_folds {n_folds}), got {fold!r}"
        )
    dealt = ("train", "val", "test") if pool == "all" else ("train", "val")
    cases = sorted((it for part in dealt for it in parts[part]), key=lambda it: it["case_id"])
    groups = sorted({it["group"] for it in cases})
    if len(groups) < n_folds:
        where = "" if pool == "all" else " outside the test part"
        raise DatasetError(
            f"{n_folds}-fold cross-validation needs at least {n_folds} patients{where}, "
            f"found {len(groups)}: pass a smaller --n_folds"
        )
    random.Random(seed).shuffle(groups)
    held = set(groups[fold::n_folds])
    return {
        "train": [it for it in cases if it["group"] not in held],
        "val": [it for it in cases if it["group"] in held],
        "test": [] if pool == "all" else parts["test"],
    }


def load_datalist(
    dataset_id: str,
    data_root: str | Path | None = None,
    split: str = "train",
    seed: int | None = None,
    channels: list[str] | None = None,
    fold: int | None = None,
    n_folds: int = 5,
    fold_pool: str = "train_val",
) -> list[dict[str, Any]]:
    """The cases of one split of ``dataset_id`` as MONAI data dicts with absolute paths.

    Args:
        dataset_id: an id of ``datasets.json``.
        data_root: the dataset's folder (default: see :func:`resolve_data_root`).
        split: ``train``, ``val``, ``test`` or ``all``.
        seed: split seed (default: the registry's for this dataset).
        channels: channel names that make up ``image``, in order (default: all).
        fold, n_folds, fold_pool: one fold of a k-fold cross-validation (:func:`fold_cases`), or None.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    parts = load_splits(dataset_id, data_root, seed, channels, fold, n_folds, fold_pool)
    if split == "all":
        return select_split(parts, split)
    if not parts[split]:
        n = sum(len(v) for v in parts.values())
        fractions = get_dataset(dataset_id).split["fractions"]
        raise DatasetError(
            f"dataset '{dataset_id}': split '{split}' is empty ({n} cases, fractions {fractions})"
        )
    return parts[split]


def select_split(parts: dict[str, list[dict[str, Any]]], split: str) -> list[dict[str, Any]]:
    """One part of :func:`load_splits`' result, or ``all`` of them sorted by case id."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    if split == "all":
        return sorted((it for part in parts.values() for it in part), key=lambda it: it["case_id"])
    return parts[split]


def evaluation_cases(
    parts: dict[str, list[dict[str, Any]]], split: str, dataset_id: str
) -> list[dict[str, Any]]:
    """The cases an evaluation scores: :func:`select_split`, refused when the split is empty (e.g. the
    test part after ``fold_pool: all``), so an evaluation never ends with no figure and exit 0."""
    cases = select_split(parts, split)
    if not cases:
        held = ", ".join(f"{name} {len(part)}" for name, part in parts.items())
        raise DatasetError(
            f"split '{split}' of dataset '{dataset_id}' holds no cases ({held}): choose another --split"
        )
    return cases


TRAIN_SPLITS = ("train", "all")


def training_cases(
    parts: dict[str, list[dict[str, Any]]], train_split: str = "train"
) -> list[dict[str, Any]]:
    """The cases a training uses: the ``train`` part, or ``all`` cases of the dataset (every
    case trains; for small real samples, where a held-out validation set costs too much)."""
    if train_split not in TRAIN_SPLITS:
        raise DatasetError(f"train_split must be one of {', '.join(TRAIN_SPLITS)}, got {train_split!r}")
    return select_split(parts, train_split)


def validation_cases(
    parts: dict[str, list[dict[str, Any]]], train_split: str = "train"
) -> list[dict[str, Any]]:
    """The cases a training validates on: the ``val`` part, or with ``train_split='all'`` the
    training cases themselves, which the log says (its figures are then not held-out and the
    best epoch is the best fit to the training cases)."""
    if train_split == "all":
        cases = training_cases(parts, train_split)
        logger.warning(
            "train_split all: all %d cases train and validation reuses them: validation figures "
            "are not held-out; evaluate on unseen cases (evaluate.yaml with another dataset)",
            len(cases),
        )
        return cases
    training_cases(parts, train_split)  # refuses an unknown train_split
    return parts["val"]


def decathlon_doc(
    dataset_id: str, root: str | Path, parts: dict[str, list[dict[str, Any]]], seed: int | None = None
) -> dict[str, Any]:
    """A Decathlon-style datalist document for ``parts`` (``train``/``val``/``test`` item lists)."""
    spec = get_dataset(dataset_id)
    channels = [c for c in spec.channels if parts.get("train") and c in parts["train"][0]] or spec.channels
    return {
        "name": spec.id,
        "description": spec.description,
        "reference": spec.citation,
        "licence": spec.licence,
        "synthetic": spec.synthetic,
        "data_root": str(root),
        "split_seed": spec.split["seed"] if seed is None else seed,
        "modality": dict(enumerate(channels)),
        "labels": {str(v): n for v, n in spec.structures.items()},
        "numTraining": len(parts.get("train", [])),
        "training": parts.get("train", []),
        "validation": parts.get("val", []),
        "test": parts.get("test", []),
    }


def write_datalist(
    dataset_id: str,
    path: str | Path,
    data_root: str | Path | None = None,
    seed: int | None = None,
    channels: list[str] | None = None,
) -> Path:
    """Write the Decathlon-style datalist JSON (``training``/``validation``/``test``) that MONAI's
    ``load_decathlon_datalist`` reads; returns its path."""
    root = resolve_data_root(dataset_id, data_root)
    parts = load_splits(dataset_id, root, seed, channels)
    return write_json(decathlon_doc(dataset_id, root, parts, seed), path)


def is_configured(dataset_id: str) -> bool:
    """Whether the real dataset ``dataset_id`` is under ``$MEDSEG_DATA_ROOT`` (``<root>/<id>/``)."""
    env = data_root_env()
    return not get_dataset(dataset_id).synthetic and env is not None and (env / dataset_id).is_dir()


def default_dataset(study: str, announce: bool = True) -> str:
    """The dataset a study's bundle uses by default: the first real dataset of the study present
    under ``$MEDSEG_DATA_ROOT``, else the study's synthetic dataset (said in one log line unless
    ``announce`` is false, e.g. when naming a run folder after the dataset was chosen)."""
    ids = list_datasets(study)
    if not ids:
        raise DatasetError(f"unknown study '{study}'")
    specs = [get_dataset(i) for i in ids]
    for spec in specs:
        if is_configured(spec.id):
            return spec.id
    synthetic = next(s.id for s in specs if s.synthetic)
    if announce:
        logger.info("no real %s data under MEDSEG_DATA_ROOT: using synthetic dataset '%s'", study, synthetic)
    return synthetic
