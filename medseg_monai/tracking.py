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

A server that stops answering mid-run does not stop training: the tracker keeps what it could not
send in ``<run folder>/mlflow_offline.json`` (:func:`journal`) and ``python -m medseg_monai.tracking
upload <folder>`` sends it later (:func:`upload`).

Every run is tagged with the git state, the dataset (id, kind, content hash), the profile, the
device and the versions of Python and the main libraries, taken from the run record
(:func:`record_tags`; ``medseg_monai.record`` computes them once per run).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from medseg_monai.errors import InputError, redact
from medseg_monai.io import write_json
from medseg_monai.mlflow_assets import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from medseg_monai.paths import project_root

if TYPE_CHECKING:
    import mlflow
    from mlflow.tracking import MlflowClient

__all__ = [
    "default_tracking_uri",
    "check_tracking_uri",
    "open_client",
    "ensure_experiment",
    "flatten_params",
    "journal",
    "mark_stale_run",
    "record_run",
    "recorded_run",
    "mlflow_dir",
    "record_tags",
    "server_answers",
    "start_run",
    "tracking_uri",
    "ui_links",
    "upload",
]

log = logging.getLogger(__name__)

DATASET_KINDS = ("synthetic", "real")
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


def _health_request(uri: str) -> urllib.request.Request:
    """The ``/health`` request of the server ``uri``; its ``user:password@`` (which urllib would take
    for part of the host name) is sent as HTTP basic auth, as MLflow's client sends it."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    request = urllib.request.Request(
        urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    )
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    return request


def _unreachable(uri: str, timeout: float) -> str | None:
    """Why the server ``uri`` does not answer its ``/health`` within ``timeout`` seconds (None: it
    does, or ``uri`` is a local store)."""
    import urllib.error

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(_health_request(uri), timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return redact(str(getattr(e, "reason", e)))


def server_answers(uri: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the tracking store ``uri`` (default: :func:`tracking_uri`) can be reached now."""
    return _unreachable(uri or tracking_uri(), timeout) is None


# the kinds of tracking store MLflow's client opens (a bare path is a local folder store)
_STORE_SCHEMES = {
    "http",
    "https",
    "sqlite",
    "file",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
}


def check_tracking_uri(timeout: float = 5.0) -> str:
    """The tracking URI, after checking that a server named by ``MLFLOW_TRACKING_URI`` answers its
    ``/health`` within ``timeout`` seconds (MLflow's own client would retry for minutes, then fail
    after training had started). A server that does not answer is refused in one line, and so is a
    local store file that is not a whole MLflow store (:func:`check_sqlite_store`)."""
    uri = tracking_uri()
    scheme = urlsplit(uri).scheme.partition("+")[0]  # postgresql+psycopg2: MLflow's SQLAlchemy URIs
    if "://" in uri and scheme not in _STORE_SCHEMES:
        raise InputError(
            f"MLFLOW_TRACKING_URI={redact(uri)}: MLflow has no tracking store of the kind '{scheme}://' "
            f"(http(s)://<server>, sqlite:///<file>, postgresql://, mysql://, file://): fix it, or unset it "
            f"to track in the local store {default_tracking_uri()}"
        )
    db = _sqlite_file(uri)
    if db is not None:  # a local store: whole, before anything of the run is written
        check_sqlite_store(db)
    reason = _unreachable(uri, timeout)
    if reason is None:
        return uri
    raise InputError(
        f"the MLflow server MLFLOW_TRACKING_URI={redact(uri)} does not answer ({reason}): start it, or "
        f"unset MLFLOW_TRACKING_URI to track in the local store {default_tracking_uri()}"
    )


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a file-backed sqlite store, None for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(urlparse(uri).path)
    if not path or path == "/:memory:":
        return None
    # sqlite:///rel.db -> path "/rel.db" (relative); sqlite:////abs.db -> "//abs.db" (absolute)
    return Path(path[1:]).expanduser().resolve()


def _local_artifact_root(uri: str) -> Path | None:
    """``<db folder>/artifacts`` for a file-backed sqlite store, None for anything else."""
    db = _sqlite_file(uri)
    return None if db is None else db.parent / "artifacts"


def open_client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` on ``uri`` (default :func:`tracking_uri`) whose store exists.

    MLflow creates a new sqlite store's tables (and runs its migrations) when a process first uses
    it; two processes doing so at once (two runs started together on a fresh machine) collide and
    one of them fails ("table experiments already exists"). A sqlite client is therefore opened
    under an exclusive lock on ``<db>.lock`` beside the database file (a few milliseconds once the
    store exists)."""
    import fcntl

    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    db = _sqlite_file(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        check_sqlite_store(db)
        return MlflowClient(tracking_uri=uri)  # creates and migrates the store on first use


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _truncated(db: Path) -> str | None:
    """``"is truncated (n of m bytes)"`` when the SQLite file is shorter than its header's page count
    says (a valid count: SQLite 3.7 and later write it), else None."""
    with db.open("rb") as f:
        header = f.read(100)
    pages, page_size = int.from_bytes(header[28:32], "big"), int.from_bytes(header[16:18], "big")
    expected, size = pages * (65536 if page_size == 1 else page_size), db.stat().st_size
    valid = header[24:28] == header[92:96]
    return f"is truncated ({size} of {expected} bytes)" if valid and expected > size else None


def check_sqlite_store(db: Path) -> None:
    """Refuse, in one line, a store file that exists but is not a whole MLflow store: empty (MLflow
    would silently start a new store in it), not an SQLite file, shorter than its header says (a
    truncated copy), damaged, or another program's database. A missing file is a new store."""
    import sqlite3

    if not db.exists():
        return
    how = f"restore it from a copy, or move it away to start a new store at {db}"
    if db.stat().st_size == 0:
        raise InputError(f"the MLflow store {db} is an empty file (a truncated copy?): {how}")
    with db.open("rb") as f:
        if f.read(16) != _SQLITE_MAGIC:
            raise InputError(f"the MLflow store {db} is not an SQLite database: {how}")
    try:
        connection = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
        try:  # a read transaction: no writer changes the file while its size is compared
            connection.execute("BEGIN")
            listed = connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            tables = {row[0] for row in listed}
            short = _truncated(db)
        finally:
            connection.close()
    except sqlite3.OperationalError as e:
        if "readonly" in str(e):  # a hot journal of a killed writer: MLflow's read-write open rolls it back
            return
        raise InputError(f"the MLflow store {db} {_truncated(db) or f'is damaged ({e})'}: {how}") from None
    except sqlite3.DatabaseError as e:
        raise InputError(f"the MLflow store {db} {_truncated(db) or f'is damaged ({e})'}: {how}") from None
    if short:
        raise InputError(f"the MLflow store {db} {short}: {how}")
    if tables and "alembic_version" not in tables:
        raise InputError(f"{db} holds another program's database (no MLflow tables): {how}")


# ----------------------------------------------------------------------------- git


def record_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The standard run tags of a run record (``medseg_monai.record.prepare_run``'s ``run.json``):
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
    """Id of experiment ``name``, created (or restored when deleted) if needed, of MLflow 3's kind for
    model training (``medseg_monai.mlflow_assets.EXPERIMENT_KIND``: the UI opens it on its runs
    table; an experiment whose kind someone already chose keeps it).

    New experiments on a local sqlite store put their artifacts under
    ``<db folder>/artifacts/<name>`` (a ``file://`` URI); a remote server chooses its own location.
    """
    from mlflow.exceptions import MlflowException

    client = client if client is not None else open_client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = _local_artifact_root(client.tracking_uri)
        location = None
        if root is not None:
            folder = root / _UNSAFE_DIR_CHARS.sub("_", name)
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.as_uri()
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created concurrently by another process
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before MLflow 3 or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
    log_system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run in experiment ``experiment`` with ``tags`` (e.g. :func:`record_tags`) and
    yield the ``mlflow.ActiveRun``; MLflow's own context manager ends it FINISHED, or FAILED when an
    exception escapes (including one while logging the params, which are flattened by
    :func:`flatten_params` and logged in batches). With ``run_id`` an existing run is continued
    (e.g. evaluation after training): params it already has are not logged again.
    ``log_system_metrics``: MLflow samples CPU, memory (GPU with ``nvidia-ml-py``) into the run's
    ``system/*`` metrics while it is open (needs ``psutil``)."""
    import mlflow
    from mlflow.entities import Param

    flat = flatten_params(params or {})
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = open_client(uri)
    experiment_id = ensure_experiment(experiment, client)
    if run_id is not None:
        flat = {k: v for k, v in flat.items() if k not in client.get_run(run_id).data.params}
        active = mlflow.start_run(
            run_id=run_id, tags=_truncate_tags(tags), log_system_metrics=log_system_metrics or None
        )
    else:
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            tags=_truncate_tags(tags),
            log_system_metrics=log_system_metrics or None,
        )
    with active:
        batch = _limits()[3]
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), batch):
            client.log_batch(active.info.run_id, params=items[i : i + batch])
        yield active


RUN_RECORD = "mlflow_run.json"


def recorded_run(output_dir: str | Path) -> str | None:
    """The MLflow run id a tracker wrote to ``<output_dir>/mlflow_run.json``, when that run is in
    the current tracking store and belongs to this folder (None otherwise: a copied run folder's
    record names the original's run, which its evaluation or resume must not change)."""
    record = Path(output_dir) / RUN_RECORD
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    uri = tracking_uri()
    folder = info.get("output_dir")  # absent from records written before it was kept
    if folder is not None and Path(folder) != Path(output_dir).resolve():
        return None
    return info["run_id"] if info.get("tracking_uri") in (uri, redact(uri)) else None


def record_run(output_dir: str | Path, run_id: str, experiment: str) -> None:
    """Write ``<output_dir>/mlflow_run.json``: the run a folder's results belong to, where (without
    the URI's credentials: the file is one of the run's artifacts), and the folder itself (a copy of
    the folder is not that run's)."""
    write_json(
        {
            "run_id": run_id,
            "experiment": experiment,
            "tracking_uri": redact(tracking_uri()),
            "output_dir": str(Path(output_dir).resolve()),
        },
        Path(output_dir) / RUN_RECORD,
    )


def mark_stale_run(output_dir: str | Path) -> str | None:
    """Mark KILLED the MLflow run recorded in ``<output_dir>/mlflow_run.json`` when it is still
    RUNNING although no process holds the folder (call it with the folder's lock held): its process
    died without ending it (kill -9, a crash of the machine). Returns the run id it marked."""
    from mlflow.exceptions import MlflowException

    run_id = recorded_run(output_dir)
    if run_id is None:
        return None
    client = open_client()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_terminated(run_id, status="KILLED")
    except MlflowException as e:
        log.warning("could not check MLflow run %s of %s: %s", run_id, output_dir, e)
        return None
    log.warning(
        "the run in %s stopped without ending (killed?): MLflow run %s marked KILLED", output_dir, run_id
    )
    return run_id


# ----------------------------------------------------------------------------- server gone: the offline journal

OFFLINE_RECORD = "mlflow_offline.json"


def journal(
    output_dir: str | Path,
    run_id: str,
    *,
    metrics: Iterable[tuple[str, float, int, int]] = (),
    tags: Mapping[str, str] | None = None,
    artifacts: Iterable[tuple[str, str | None]] = (),
    status: str | None = None,
) -> Path:
    """Keep in ``<output_dir>/mlflow_offline.json`` what could not be sent to the run ``run_id`` while
    its MLflow server was away: metrics ``(key, value, timestamp ms, step)``, tags, artifacts
    ``(path relative to output_dir, artifact folder)`` and the status to end the run with.
    :func:`upload` sends it when the server is back."""
    path = Path(output_dir) / OFFLINE_RECORD
    entry = json.loads(path.read_text()) if path.is_file() else {}
    if entry.get("run_id", run_id) != run_id:
        raise RuntimeError(f"{path} holds run {entry['run_id']}, not {run_id}")
    entry.setdefault("run_id", run_id)
    entry.setdefault("tracking_uri", redact(tracking_uri()))  # what it was for; upload never sends there
    entry.setdefault("metrics", []).extend([k, float(v), int(t), int(s)] for k, v, t, s in metrics)
    entry.setdefault("tags", {}).update(tags or {})
    entry.setdefault("artifacts", []).extend([a, d] for a, d in artifacts)
    if status is not None:
        entry["status"] = status
    write_json(entry, path)
    return path


def _journal(path: Path) -> dict[str, Any]:
    """An offline journal read as data: its run id, metrics, tags, end status and files, each file
    inside the journal's run folder (a name that leads out of it, through ``..``, an absolute path or
    a link, is refused in one line before anything of the journal is sent)."""
    folder = path.parent.resolve()
    try:
        entry = json.loads(path.read_text())
        journal = {
            "run_id": str(entry["run_id"]),
            "metrics": [(str(k), float(v), int(t), int(s)) for k, v, t, s in entry.get("metrics", [])],
            "tags": {str(k): str(v) for k, v in entry.get("tags", {}).items()},
            "artifacts": [(str(n), None if d is None else str(d)) for n, d in entry.get("artifacts", [])],
            "status": entry.get("status"),
        }
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: not an offline journal of this suite ({type(e).__name__}: {e})") from None
    if journal["status"] not in (None, "FINISHED", "FAILED", "KILLED"):
        raise InputError(f"{path}: unknown end status {journal['status']!r}")
    for name, artifact_path in journal["artifacts"]:
        inside = (folder / name).resolve().is_relative_to(folder)
        escapes = artifact_path is not None and (
            artifact_path.startswith("/") or ".." in artifact_path.split("/")
        )
        if not inside or escapes:
            raise InputError(
                f"{path}: refusing to upload '{name}' (to {artifact_path or 'the run'}), which is outside "
                f"the run folder {folder}: nothing of this journal was sent"
            )
    return journal


def upload(paths: Iterable[str | Path], uri: str | None = None) -> int:
    """Send every ``mlflow_offline.json`` under ``paths`` (run folders, or folders of them) to its run in
    the store ``uri``, else the configured one (:func:`tracking_uri`): metrics, tags, the files of the
    run's folder, then the run's end status; each journal is removed once sent. The store a journal
    names is never used: a journal is data from a run folder, which may come from anyone. Returns
    the runs uploaded."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    found = sorted(
        {j for p in map(Path, paths) for j in ([p] if p.name == OFFLINE_RECORD else p.rglob(OFFLINE_RECORD))}
    )
    if not found:
        log.info("nothing to upload: no %s under %s", OFFLINE_RECORD, ", ".join(map(str, paths)))
        return 0
    target = uri or tracking_uri()
    reason = _unreachable(target, 3.0)
    if reason is not None:
        raise InputError(
            f"the MLflow server {redact(target)} does not answer ({reason}): start it, then upload again"
        )
    client = open_client(target)
    for path in found:
        entry, folder = _journal(path), path.parent
        run_id = entry["run_id"]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise InputError(
                f"{path}: MLflow run {run_id} is not in {redact(target)}: pass the store the run tracked to "
                "(--tracking_uri, or MLFLOW_TRACKING_URI)"
            ) from None
        metrics = [Metric(*m) for m in entry["metrics"]]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for key, value in _truncate_tags(entry["tags"]).items():
            client.set_tag(run_id, key, value)
        for name, artifact_path in entry["artifacts"]:
            if (folder / name).is_file():
                client.log_artifact(run_id, str(folder / name), artifact_path=artifact_path)
        if entry["status"]:
            client.set_terminated(run_id, status=entry["status"])
        path.unlink()
        log.info(
            "uploaded %d metric values, %d tags and %d files of %s to run %s (%s)",
            len(metrics), len(entry["tags"]), len(entry["artifacts"]), folder, run_id, redact(target),
        )  # fmt: skip
    return len(found)


def ui_links(base_url: str, client: MlflowClient | None = None) -> list[tuple[str, str]]:
    """(experiment, link) for every experiment in the store, the link opening its runs table.

    MLflow 3.17's UI opens an experiment on its GenAI overview unless the link says
    ``workflowType=machine_learning`` or the browser has chosen "Model training" before (a browser
    setting; the experiment's ``mlflow.experimentKind`` tag does not decide it)."""
    client = client or open_client()
    base = base_url.rstrip("/")
    return [
        (e.name, f"{base}/#/experiments/{e.experiment_id}?workflowType=machine_learning")
        for e in sorted(client.search_experiments(), key=lambda e: e.name)
        if e.name != "Default"
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m medseg_monai.tracking upload <folder>...``: send what runs kept on disk while their
    MLflow server was away (``mlflow_offline.json``); ``links <url>``: each experiment's runs table
    in the MLflow UI served at ``url``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="medseg-tracking", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="send the offline journals under these folders to their runs")
    up.add_argument("folders", nargs="+", type=Path)
    up.add_argument(
        "--tracking_uri",
        help="the store to send to (default: MLFLOW_TRACKING_URI, else the local store; never the one a journal names)",
    )
    links = sub.add_parser("links", help="each experiment's runs table in the MLflow UI served at URL")
    links.add_argument("url", help="where the UI is served, e.g. http://127.0.0.1:5000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "links":
        for name, link in ui_links(args.url):
            print(f"{name:>8}: {link}")
        return 0
    try:
        n = upload(args.folders, args.tracking_uri)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"uploaded {n} run(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
