"""MLflow tracking helpers: one experiment per study, one run per (variant, seed).

Where runs go
-------------
* ``MLFLOW_TRACKING_URI`` (environment): used as is when set, e.g. a team server ``http://host:5000``.
  The server then decides where artifacts live.
* Otherwise the default local store ``sqlite:///<mlflow dir>/mlflow.db`` with artifacts under
  ``<mlflow dir>/artifacts/<experiment name>/`` (MLflow 3 no longer accepts the plain file store).
* ``<mlflow dir>`` is ``<repo>/mlflow`` (``<repo>``: the folder holding the ``medseg_monai`` package),
  or the folder named by ``MEDSEG_MLFLOW_DIR`` (environment) when set.

Note that ``mlflow.set_tracking_uri`` (called by :func:`start_run`) also exports
``MLFLOW_TRACKING_URI`` to the process environment, so later calls in the same process and its
subprocesses keep using that store.

Dataset fingerprints
--------------------
:func:`content_hash` memoises the SHA-256 of every file in ``$MEDSEG_CACHE/fingerprints.json``
(``MEDSEG_CACHE`` defaults to ``$XDG_CACHE_HOME/medseg-monai``, else ``~/.cache/medseg-monai``),
keyed by absolute path and validated by size and ``mtime_ns``; a second call only stats the files.

Every run is tagged with the git state, the dataset (id, kind, content hash), the profile, the
device and the versions of Python and the main libraries (see :func:`run_tags`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from medseg_monai.paths import cache_dir, project_root

if TYPE_CHECKING:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

__all__ = [
    "content_hash",
    "default_tracking_uri",
    "device_description",
    "ensure_experiment",
    "flatten_params",
    "git_state",
    "mlflow_dir",
    "project_root",
    "record_tags",
    "run_tags",
    "start_run",
    "tracking_uri",
]

log = logging.getLogger(__name__)

DATASET_KINDS = ("synthetic", "real")
_CHUNK = 1 << 20  # 1 MiB reads when hashing
_HASH_CHARS = 16
# Files modified this recently are hashed but not memoised: on file systems with coarse
# timestamps a same-size rewrite within one tick would otherwise go unnoticed ("racy" entries).
_RACY_WINDOW_NS = 2_000_000_000
_GIT_TIMEOUT_S = 10.0
# MLflow's limits (mlflow.utils.validation); fallbacks are the values of MLflow 2.16-3.x.
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
_MAX_KEY_LENGTH = 250
_MAX_PARAMS_PER_BATCH = 100
_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- ]")
_UNSAFE_DIR_CHARS = re.compile(r"[^\w.\-]")


# ----------------------------------------------------------------------------- locations


def mlflow_dir() -> Path:
    """Folder holding ``mlflow.db`` and ``artifacts/``: ``$MEDSEG_MLFLOW_DIR`` or ``<repo>/mlflow``."""
    override = os.environ.get("MEDSEG_MLFLOW_DIR")
    if override:
        return Path(override).expanduser().resolve()
    return project_root() / "mlflow"


def default_tracking_uri() -> str:
    """The default local store, ``sqlite:///<mlflow dir>/mlflow.db`` (creates nothing)."""
    return f"sqlite:///{(mlflow_dir() / 'mlflow.db').as_posix()}"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the default store (whose folder is then created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    (mlflow_dir() / "artifacts").mkdir(parents=True, exist_ok=True)
    return default_tracking_uri()


def _local_artifact_root(uri: str) -> Path | None:
    """``<db folder>/artifacts`` for a file-backed sqlite store, None for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(urlparse(uri).path)
    if not path or path == "/:memory:":
        return None
    # sqlite:///rel.db -> path "/rel.db" (relative); sqlite:////abs.db -> "//abs.db" (absolute)
    return Path(path[1:]).expanduser().resolve().parent / "artifacts"


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


def _version(module: str, distribution: str) -> str:
    mod = sys.modules.get(module)
    version = getattr(mod, "__version__", None) if mod is not None else None
    if version:
        return str(version)
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _library_versions() -> dict[str, str]:
    from medseg_monai import __version__

    return {
        "python": platform.python_version(),
        "torch": _version("torch", "torch"),
        "monai": _version("monai", "monai"),
        "mlflow": _version("mlflow", "mlflow"),
        "numpy": _version("numpy", "numpy"),
        "medseg_monai": __version__,
    }


def record_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The standard run tags of a run record (``medseg_monai.bundle.prepare_run``'s ``run.json``):
    git state, dataset id, kind and content hash, profile, device and library versions."""
    versions = record.get("versions", {})
    dataset = record["dataset"]
    if dataset["kind"] not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {dataset['kind']!r}")
    return {
        **record["git"],
        "dataset.id": str(dataset["id"]),
        "dataset.hash": str(dataset["hash"]),
        "dataset.kind": dataset["kind"],
        "profile": str(record.get("profile", "default")),
        "device": str(record["device"]),
        **{f"version.{k.replace('-', '_')}": str(v) for k, v in versions.items()},
    }


def run_tags(
    dataset_id: str,
    dataset_kind: str,
    data_paths: Iterable[str | Path],
    profile: str,
    device: str | torch.device | None = None,
) -> dict[str, str]:
    """The standard tags computed afresh, for a run that has no record (e.g. a job that failed before
    its bundle started): as :func:`record_tags` of the record such a run would have written."""
    if dataset_kind not in DATASET_KINDS:
        raise ValueError(f"dataset_kind must be one of {DATASET_KINDS}, got {dataset_kind!r}")
    record = {
        "git": git_state(),
        "dataset": {"id": dataset_id, "kind": dataset_kind, "hash": content_hash(data_paths)},
        "profile": profile,
        "device": device_description(device),
        "versions": _library_versions(),
    }
    return record_tags(record)


# ----------------------------------------------------------------------------- params


def _limits() -> tuple[int, int, int, int]:
    try:
        from mlflow.utils import validation as v
    except ImportError:  # pragma: no cover
        return _MAX_PARAM_VAL_LENGTH, _MAX_TAG_VAL_LENGTH, _MAX_KEY_LENGTH, _MAX_PARAMS_PER_BATCH
    return (
        getattr(v, "MAX_PARAM_VAL_LENGTH", _MAX_PARAM_VAL_LENGTH),
        getattr(v, "MAX_TAG_VAL_LENGTH", _MAX_TAG_VAL_LENGTH),
        getattr(v, "MAX_ENTITY_KEY_LENGTH", _MAX_KEY_LENGTH),
        getattr(v, "MAX_PARAMS_TAGS_PER_BATCH", _MAX_PARAMS_PER_BATCH),
    )


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into dotted keys with string values fit for ``mlflow.log_params``.

    Characters MLflow rejects in keys become ``_``; keys and values are truncated to MLflow's
    limits (250 / 6000 characters). An empty nested mapping is kept as ``"{}"``.
    """
    max_val, _, max_key, _ = _limits()
    out: dict[str, str] = {}
    for raw_key, value in d.items():
        key = _INVALID_KEY_CHARS.sub("_", str(raw_key))
        key = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, key))
            continue
        text = "{}" if isinstance(value, Mapping) else str(value)
        out[key[:max_key]] = text[:max_val]
    return out


# ----------------------------------------------------------------------------- experiments and runs


def ensure_experiment(name: str, client: MlflowClient | None = None) -> str:
    """Id of experiment ``name``, created (or restored when deleted) if needed.

    New experiments on a local sqlite store put their artifacts under
    ``<db folder>/artifacts/<name>`` (a ``file://`` URI); a remote server chooses its own location.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = client if client is not None else MlflowClient(tracking_uri=tracking_uri())
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = _local_artifact_root(client.tracking_uri)
        location = None
        if root is not None:
            folder = root / _UNSAFE_DIR_CHARS.sub("_", name)
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created concurrently by another process
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _truncate_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    _, max_tag, _, _ = _limits()
    return {str(k): str(v)[:max_tag] for k, v in tags.items()}


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str,
    *,
    tags: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run in experiment ``experiment`` with ``tags`` (e.g. :func:`record_tags`) and
    yield the ``mlflow.ActiveRun``; MLflow's own context manager ends it FINISHED, or FAILED when an
    exception escapes (including one while logging the params, which are flattened by
    :func:`flatten_params` and logged in batches). With ``run_id`` an existing run is continued
    (e.g. evaluation after training): params it already has are not logged again."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    flat = flatten_params(params or {})
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(experiment, client)
    if run_id is not None:
        flat = {k: v for k, v in flat.items() if k not in client.get_run(run_id).data.params}
        active = mlflow.start_run(run_id=run_id, tags=_truncate_tags(tags))
    else:
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=_truncate_tags(tags))
    with active:
        batch = _limits()[3]
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), batch):
            client.log_batch(active.info.run_id, params=items[i : i + batch])
        yield active
