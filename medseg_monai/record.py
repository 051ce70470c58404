"""The run record: what a run decided, computed once and written next to its results (nnU-Net's
habit): ``config.json`` (the merged config), ``datalist.json`` (the cases and split) and
``run.json`` (dataset id, kind, root and content hash, case ids, device, the command, git state,
library versions). The MLflow tracker and ``reproduce`` read ``run.json`` instead of computing any
of it again.

Dataset fingerprints
--------------------
:func:`content_hash` memoises the SHA-256 of every file in ``$MEDSEG_CACHE/fingerprints.json``
(``MEDSEG_CACHE`` defaults to ``$XDG_CACHE_HOME/medseg-monai``, else ``~/.cache/medseg-monai``),
keyed by absolute path and validated by size and ``mtime_ns``; a second call only stats the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg_monai import __version__
from medseg_monai.config import config_parser, parse_command_line, shortened
from medseg_monai.data import decathlon_doc, get_dataset, resolve_data_root
from medseg_monai.errors import InputError
from medseg_monai.io import write_json
from medseg_monai.paths import cache_dir, project_root
from medseg_monai.tracking import DATASET_KINDS, mark_stale_run, record_tags

if TYPE_CHECKING:
    import torch

__all__ = [
    "content_hash",
    "cpu_description",
    "device_description",
    "git_state",
    "library_versions",
    "claim_output_dir",
    "holds_results",
    "lock_output_dir",
    "is_distributed",
    "merged_config",
    "prepare_run",
    "rank",
    "read_run_record",
    "run_tags",
    "train_overlap",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB reads when hashing
_HASH_CHARS = 16
# Files modified this recently are hashed but not memoised: on file systems with coarse
# timestamps a same-size rewrite within one tick would otherwise go unnoticed ("racy" entries).
_RACY_WINDOW_NS = 2_000_000_000
_GIT_TIMEOUT_S = 10.0


# ----------------------------------------------------------------------------- the process under DDP


def is_distributed() -> bool:
    """Whether this process is one of a DDP run's (torchrun, after ``init_process_group``)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in a DDP run, 0 outside one: rank 0 writes the record and the results."""
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


# ----------------------------------------------------------------------------- git


def _git(args: list[str], cwd: Path) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # read-only: never take index.lock
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(path: Path | None = None) -> dict[str, str]:
    """``{"git.commit": sha, "git.dirty": "true"|"false"}`` of the checkout holding ``path``.

    Untracked (not ignored) files count as dirty. Both values are ``"unknown"`` when ``path`` is not
    in a git checkout or git is unavailable; never raises.
    """
    cwd = Path(path) if path is not None else project_root()
    if cwd.is_file():
        cwd = cwd.parent
    unknown = {"git.commit": "unknown", "git.dirty": "unknown"}
    if not cwd.is_dir() or _git(["rev-parse", "--is-inside-work-tree"], cwd) is None:
        return unknown
    head = _git(["rev-parse", "--verify", "-q", "HEAD"], cwd)
    status = _git(["status", "--porcelain"], cwd)
    return {
        "git.commit": head.strip() if head and head.strip() else "unknown",
        "git.dirty": "unknown" if status is None else ("true" if status.strip() else "false"),
    }


# ----------------------------------------------------------------------------- dataset fingerprint


def _load_fingerprints(path: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_fingerprints(path: Path, updates: Mapping[str, list[Any]]) -> None:
    """Merge ``updates`` into the cache file atomically (temp file + ``os.replace``); best effort."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = _load_fingerprints(path)  # re-read: other processes may have added entries
        merged.update(updates)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fingerprints.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(merged, fh, separators=(",", ":"), sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning("could not update the fingerprint cache %s: %s", path, exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _dataset_files(paths: Iterable[str | Path]) -> set[tuple[str, Path]]:
    """``(relative posix name, resolved file)`` for every non-hidden file under ``paths``.

    Names are relative to the deepest folder holding all given paths (a lone folder keeps its own
    name as the first component), so they do not depend on where the dataset lives.
    """
    roots = []
    for given in paths:
        # Named as given (absolute, links kept) so a symlinked dataset keeps its names; read resolved.
        root = Path(os.path.abspath(Path(given).expanduser()))
        if not root.exists():
            raise FileNotFoundError(f"dataset path does not exist: {given}")
        roots.append(root)
    if not roots:
        return set()
    base = Path(os.path.commonpath([r.parent for r in roots]))
    files: set[tuple[str, Path]] = set()
    for root in roots:
        if root.is_file():
            files.add((root.relative_to(base).as_posix(), root.resolve()))
            continue
        seen_dirs: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen_dirs:  # symlink loop
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                full = Path(dirpath, name)
                if name.startswith(".") or not full.is_file():
                    continue
                files.add((full.relative_to(base).as_posix(), full.resolve()))
    return files


def content_hash(paths: Iterable[str | Path]) -> str:
    """Fingerprint of a dataset: SHA-256 over the sorted relative file list and every file's bytes.

    ``paths`` are files and/or folders (recursed; hidden files and folders inside them are
    skipped). Names are taken relative to the deepest folder holding all of ``paths``, so the hash
    depends neither on where the dataset lives nor on the order of ``paths``; renaming a file
    changes it. Returns the first 16 hex characters. Per-file digests are memoised (see the module
    docstring).
    """
    files = _dataset_files(paths)
    cache_file = cache_dir() / "fingerprints.json"
    cache = _load_fingerprints(cache_file)
    updates: dict[str, list[Any]] = {}
    now_ns = time.time_ns()
    entries: list[tuple[str, str]] = []
    for rel, path in files:
        st = path.stat()
        key = str(path)
        entry = cache.get(key)
        if (
            isinstance(entry, list)
            and len(entry) == 3
            and entry[0] == st.st_size
            and entry[1] == st.st_mtime_ns
            and isinstance(entry[2], str)
        ):
            digest = entry[2]
        else:
            digest = _file_digest(path)
            if now_ns - st.st_mtime_ns > _RACY_WINDOW_NS:
                updates[key] = [st.st_size, st.st_mtime_ns, digest]
        entries.append((rel, digest))
    total = hashlib.sha256()
    for rel, digest in sorted(entries):
        total.update(rel.encode("utf-8") + b"\0" + digest.encode("ascii") + b"\n")
    if updates:
        _store_fingerprints(cache_file, updates)
    return total.hexdigest()[:_HASH_CHARS]


# ----------------------------------------------------------------------------- environment


def device_description(device: str | torch.device | None = None) -> str:
    """``"cpu"``, ``"cuda:0 (<GPU name>)"``, ``"mps"``...; picks cuda:<current> or cpu when None."""
    import torch

    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return str(dev)
    if not torch.cuda.is_available():
        return f"cuda:{dev.index or 0}"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    try:
        name = torch.cuda.get_device_name(index)
    except Exception:  # a description must never break a run
        return f"cuda:{index}"
    return f"cuda:{index} ({name})"


def cpu_description() -> str:
    """The processor, its cores and the vector instructions torch's CPU kernels use, e.g.
    ``"AMD EPYC, 2 cores, AVX512"``: CPU timings from two hosts compare only when these agree (the
    same grid ran 2.6 times faster on an AVX-512 host than on an AVX2 one)."""
    import torch

    name = platform.processor() or platform.machine()
    try:  # Linux: the marketing name; platform.processor() is often just the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count() or 1} cores, {torch.backends.cpu.get_cpu_capability()}"


def torch_threads() -> int:
    """The CPU threads torch computes with (``OMP_NUM_THREADS`` or ``torch.set_num_threads``)."""
    import torch

    return torch.get_num_threads()


def _version(module: str, distribution: str) -> str:
    mod = sys.modules.get(module)
    version = getattr(mod, "__version__", None) if mod is not None else None
    if version:
        return str(version)
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str]:
    """Python's and the main libraries' versions, by package name."""
    return {
        "python": platform.python_version(),
        "torch": _version("torch", "torch"),
        "monai": _version("monai", "monai"),
        "mlflow": _version("mlflow", "mlflow"),
        "numpy": _version("numpy", "numpy"),
        "pytorch-ignite": _version("ignite", "pytorch-ignite"),
        "medseg-monai": __version__,
    }


def run_tags(
    dataset_id: str,
    dataset_kind: str,
    data_paths: Iterable[str | Path],
    profile: str,
    device: str | torch.device | None = None,
) -> dict[str, str]:
    """The standard tags computed afresh, for a run that has no record (e.g. a job that failed before
    its bundle started): ``medseg_monai.tracking.record_tags`` of the record it would have written."""
    if dataset_kind not in DATASET_KINDS:
        raise ValueError(f"dataset_kind must be one of {DATASET_KINDS}, got {dataset_kind!r}")
    record = {
        "git": git_state(),
        "dataset": {"id": dataset_id, "kind": dataset_kind, "hash": content_hash(data_paths)},
        "profile": profile,
        "device": device_description(device),
        "versions": library_versions(),
    }
    return record_tags(record)


# ----------------------------------------------------------------------------- the run record


def merged_config(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The merged raw config (files, metadata under ``_meta_``, then overrides; expressions unevaluated,
    macros expanded) of the ``monai.bundle run`` command ``argv`` (default: this process's), as MONAI
    builds it; None when ``argv`` is no such command (e.g. a bundle built from Python)."""
    files, metas, overrides = parse_command_line(sys.argv if argv is None else argv)
    if not files:
        return None
    return json.loads(json.dumps(config_parser(files, overrides, metas).get(), default=str))


def prepare_run(
    output_dir: str,
    *,
    study: str,
    experiment: str,
    profile: str,
    dataset: str,
    data_root: str | None,
    seed: int,
    device: Any = None,
    splits: dict[str, list[dict[str, Any]]],
    prefix: str = "",
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Claim ``output_dir`` and write what the run decided, once: ``config.json`` (the merged config
    of the command that started the run), ``datalist.json`` (the cases of ``splits``, Decathlon style)
    and ``run.json`` (dataset id, kind, root and content hash, case ids, device, command, git state,
    versions, pid and host), each name behind ``prefix`` (evaluation writes ``eval_<split>_run.json``
    beside the training's record). Only rank 0 writes under DDP. Returns run.json's content.

    The folder is locked for this process (:func:`lock_output_dir`). A training (no ``prefix``) into
    a folder that holds another run's record is refused unless ``resume`` (continue that run) or
    ``overwrite`` (its files are deleted first)."""
    if rank() == 0:
        claim_output_dir(output_dir, resume=resume, overwrite=overwrite, training=not prefix)
    spec = get_dataset(dataset)
    root = resolve_data_root(dataset, data_root)
    record = {
        "study": study,
        "experiment": experiment,
        "profile": profile,
        "seed": seed,
        "dataset": {
            "id": spec.id,
            "kind": spec.kind,
            "root": str(root),
            "hash": content_hash([root]),
            "split_seed": spec.split["seed"],
            "cases": {k: [c["case_id"] for c in v] for k, v in splits.items()},
        },
        "device": device_description(device),
        # CPU results depend on it: the threads split float sums in another order
        "cpu_threads": torch_threads(),
        "cpu": cpu_description(),
        "command": list(sys.argv),
        "cwd": os.getcwd(),
        "git": git_state(project_root()),
        "versions": library_versions(),
        "pid": os.getpid(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if rank() > 0:  # under DDP rank 0 writes the record
        return record
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(decathlon_doc(dataset, root, splits), out / f"{prefix}datalist.json")
    config = merged_config()
    if resume and not prefix and config is not None:
        check_resumed_settings(out / "config.json", config)
    if config is not None:
        write_json(config, out / f"{prefix}config.json")
    write_json(record, out / f"{prefix}run.json")
    return record


# what a resumed run may change: how far and how fast it trains, not what it computes
RESUMABLE_CHANGES = frozenset({"max_epochs", "resume", "overwrite", "num_workers", "cache_rate", "fast"})


def check_resumed_settings(recorded_file: Path, config: Mapping[str, Any]) -> None:
    """Refuse, in one line, to resume a run with settings that differ from those it started with
    (its ``config.json``): its first epochs and its record would say one thing, its last epochs
    another. Only :data:`RESUMABLE_CHANGES` may differ (e.g. ``--max_epochs`` to train on)."""
    try:
        recorded = json.loads(recorded_file.read_text())
    except (OSError, ValueError):
        return  # no record to hold it to (claim_output_dir decided the folder may be resumed)
    now = json.loads(json.dumps(config))  # as it would be recorded
    missing = object()
    changed = [
        k
        for k in sorted(set(recorded) | set(now))
        if k not in RESUMABLE_CHANGES and recorded.get(k, missing) != now.get(k, missing)
    ]
    if not changed:
        return
    shown = "; ".join(
        f"{k} {shortened(now.get(k))} now, {shortened(recorded.get(k))} in the record" for k in changed[:3]
    )
    more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
    raise InputError(
        f"--resume true continues the run in {recorded_file.parent} as it started, but its settings differ from "
        f"{recorded_file.name}: {shown}{more}. Resume with the command that started it (--max_epochs may grow), "
        "or start a new run (--overwrite true, or another --output_dir)"
    )


_LOCKS: dict[Path, Any] = {}  # folders this process holds: the OS releases them when it exits


def try_lock(path: Path, holder: str = "pid", unknown: str = "another process") -> tuple[Any | None, str]:
    """An exclusive lock on the file ``path``, without waiting: ``(handle, "")`` when taken, the file
    then saying who holds it (``"<holder> <pid> on <host>"``; closing the handle, or this process
    ending, lets go), or ``(None, who)`` while another process holds it (``unknown`` if it wrote
    nothing)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        who = handle.read().strip() or unknown
        handle.close()
        return None, who
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder} {os.getpid()} on {platform.node()}")
    handle.flush()
    return handle, ""


def lock_output_dir(output_dir: str | Path) -> None:
    """Hold an exclusive lock on ``<output_dir>/.lock`` for the rest of this process (re-entrant:
    training then evaluating in one process is fine); another process is refused in one line."""
    out = Path(output_dir).resolve()
    if out in _LOCKS:
        return
    handle, holder = try_lock(out / ".lock")
    if handle is None:
        raise InputError(f"output_dir {out} is in use by {holder}: wait for it, or pass another --output_dir")
    _LOCKS[out] = handle


# what a training leaves once an epoch is complete (TrainingCheckpoint, the final CheckpointSaver) and
# what an evaluation leaves: a folder with none of these holds no result, only a start that failed
_RESULTS = ("checkpoint.pt", "model_final.pt", "metrics.json", "metrics_*.json")


def holds_results(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a result worth protecting: a completed epoch's checkpoint, a
    finished training's model or an evaluation's metrics. A run that stopped before its first epoch
    ended (a wrong setting, Ctrl-C) leaves only its record, which the next start may replace."""
    out = Path(output_dir)
    return any(next(out.glob(pattern), None) is not None for pattern in _RESULTS)


def _described(record_file: Path) -> str:
    try:
        old = json.loads(record_file.read_text())
        return (
            f"run '{old['experiment']} seed{old['seed']}' ({old.get('profile', '?')} profile, "
            f"started {old.get('started', '?')})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another run"


def _empty(out: Path) -> None:
    import shutil

    for path in out.iterdir():
        if path.name != ".lock":
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def claim_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool, training: bool = True) -> None:
    """Lock ``output_dir`` and check that a training may write there: a folder holding another run's
    results (:func:`holds_results`) is refused unless ``resume`` or ``overwrite`` (which deletes its
    files); the record of a run that never completed an epoch is replaced, saying so. ``resume`` is
    refused, before any MLflow run is touched, when there is no checkpoint to continue from."""
    out = Path(output_dir).resolve()
    lock_output_dir(out)
    mark_stale_run(out)  # no process holds the folder now: a run still RUNNING there was killed
    previous = out / "run.json"
    if not training:
        return
    if resume:
        if not (out / "checkpoint.pt").is_file():
            why = (
                f"{_described(previous)} stopped before its first epoch ended"
                if previous.is_file()
                else "no run was started there"
            )
            raise InputError(
                f"nothing to resume in {out}: {why} (checkpoint.pt is saved when an epoch completes): "
                "start the run without --resume true"
            )
        return
    if not previous.is_file():
        return
    if overwrite:
        _empty(out)
        return
    if not holds_results(out):
        log.warning(
            "output_dir %s holds %s, which stopped before its first epoch ended: starting again in its place",
            out,
            _described(previous),
        )
        _empty(out)
        return
    raise InputError(
        f"output_dir {out} holds the results of {_described(previous)}: pass --resume true to continue "
        "it, --overwrite true to replace it, or another --output_dir"
    )


def read_run_record(output_dir: str | Path, prefix: str = "") -> dict[str, Any]:
    """``<output_dir>/<prefix>run.json``, written by :func:`prepare_run` at the start of the run."""
    path = Path(output_dir) / f"{prefix}run.json"
    if not path.is_file():
        raise InputError(f"no run record at {path}: the run's initialize step writes it (prepare_run)")
    return json.loads(path.read_text())


def train_overlap(
    ckpt_path: str | Path, dataset: str, split: str, cases: Sequence[dict[str, Any]], allow: bool = False
) -> list[str]:
    """The cases of an evaluation (``cases`` of ``split``) that the checkpoint's model trained on, by
    the case lists of the training's record beside it (``run.json``; none: nothing to check). Scores on
    them are not held-out scores, so any overlap is refused in one line unless ``allow`` (then it is
    logged, and the caller tags the MLflow run); the ``train`` split is scored knowingly. Returns the
    overlapping case ids."""
    if split == "train":  # asked for by name: its metrics are eval_train_*, the training's cases
        return []
    record_file = Path(ckpt_path).expanduser().resolve().parent / "run.json"
    try:
        trained = json.loads(record_file.read_text())["dataset"]
        trained_ids = set(trained["cases"]["train"]) if trained["id"] == get_dataset(dataset).id else set()
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no training record (a checkpoint from elsewhere), or one of another dataset
    overlap = [str(c["case_id"]) for c in cases if str(c["case_id"]) in trained_ids]
    if not overlap:
        return []
    shown = ", ".join(overlap[:3]) + (", ..." if len(overlap) > 3 else "")
    what = f"{len(overlap)} of the {len(cases)} cases of split '{split}' ({shown})"
    if not allow:
        raise InputError(
            f"{what} trained the model {ckpt_path} ({record_file}): their scores would not be held out; "
            "evaluate a split it did not train on, or pass --allow_train_overlap true to score them anyway "
            "(the MLflow run is then tagged)"
        )
    log.warning(
        "%s trained the model %s: scored anyway (allow_train_overlap), tagged so in MLflow", what, ckpt_path
    )
    return overlap
