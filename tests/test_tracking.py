"""Tests for medseg_monai.tracking (local sqlite store and a real MLflow server on loopback)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import medseg_monai
from medseg_monai import record, tracking
from medseg_monai.errors import InputError

pytestmark = pytest.mark.filterwarnings(
    # SQLAlchemy 2.x deprecation raised from inside MLflow's sqlite store; not ours to fix.
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning",
)

_MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "MLFLOW_ARTIFACT_URI",
)
_OLD = time.time() - 3600  # mtimes outside the "racy" window, so digests get memoised


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point every store and cache at tmp_path; never touch <repo>/mlflow or ~/.cache."""
    for name in _MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # also drops the MLFLOW_TRACKING_URI it exported


def _write(path: Path, data: bytes, mtime: float = _OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data" / "toy"
    _write(root / "case0" / "image.nii.gz", bytes(range(256)) * 64)
    _write(root / "case0" / "label.nii.gz", b"\x00\x01" * 100)
    _write(root / "case1" / "image.nii.gz", b"second case")
    _write(root / ".medseg_ready", b"marker")
    return root


@pytest.fixture
def frozen_git(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The repo's real git state, taken once: others may commit while a test runs."""
    state = record.git_state()
    monkeypatch.setattr(record, "git_state", lambda path=None: dict(state))  # what run_tags calls
    return state


# ----------------------------------------------------------------------------- flatten_params


def test_flatten_params_nested_and_stringified():
    flat = tracking.flatten_params(
        {"lr": 1e-3, "model": {"name": "unet", "channels": [16, 32], "opts": {"norm": None}}, "empty": {}}
    )
    assert flat == {
        "lr": "0.001",
        "model.name": "unet",
        "model.channels": "[16, 32]",
        "model.opts.norm": "None",
        "empty": "{}",
    }
    assert tracking.flatten_params({"a": 1}, prefix="p") == {"p.a": "1"}


def test_flatten_params_limits_and_bad_keys():
    flat = tracking.flatten_params({"x" * 300: "v", "a=b": "y" * 10_000, 3: True})
    assert flat["x" * 250] == "v"
    assert flat["a_b"] == "y" * 6000
    assert flat["3"] == "True"


# ----------------------------------------------------------------------------- content_hash


def test_content_hash_stable_and_byte_sensitive(dataset: Path):
    first = record.content_hash([dataset])
    assert len(first) == 16 and int(first, 16) >= 0
    assert record.content_hash([dataset]) == first
    assert record.content_hash([str(dataset)]) == first

    label = dataset / "case0" / "label.nii.gz"
    original = label.read_bytes()
    changed = bytearray(original)
    changed[7] ^= 0x01  # one bit of one byte, same size
    _write(label, bytes(changed), _OLD + 10)
    assert record.content_hash([dataset]) != first

    _write(label, original, _OLD + 20)  # same bytes again, other mtime -> same hash
    assert record.content_hash([dataset]) == first


def test_content_hash_ignores_hidden_order_and_location(dataset: Path, tmp_path: Path):
    first = record.content_hash([dataset])
    _write(dataset / ".medseg_ready", b"another marker")
    _write(dataset / ".cache" / "x.bin", b"hidden folder")
    assert record.content_hash([dataset]) == first

    a, b = dataset / "case0", dataset / "case1"
    assert record.content_hash([a, b]) == record.content_hash([b, a])
    files = sorted(dataset.rglob("*.gz"))
    by_files = record.content_hash(files)
    assert record.content_hash(files[::-1]) == by_files

    # Same-named files in different folders stay distinct: swapping their bytes changes the hash.
    img0, img1 = dataset / "case0" / "image.nii.gz", dataset / "case1" / "image.nii.gz"
    b0, b1 = img0.read_bytes(), img1.read_bytes()
    _write(img0, b1, _OLD + 30)
    _write(img1, b0, _OLD + 30)
    assert record.content_hash(files) != by_files
    _write(img0, b0, _OLD + 40)
    _write(img1, b1, _OLD + 40)

    moved = tmp_path / "elsewhere" / dataset.name
    shutil.copytree(dataset, moved)
    assert record.content_hash([moved]) == first
    link = tmp_path / "links" / dataset.name
    link.parent.mkdir()
    link.symlink_to(moved, target_is_directory=True)
    assert record.content_hash([link]) == first

    (moved / "case1" / "image.nii.gz").rename(moved / "case1" / "img.nii.gz")
    assert record.content_hash([moved]) != first


def test_content_hash_uses_memo(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[Path] = []
    real = record._file_digest

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(record, "_file_digest", counting)
    first = record.content_hash([dataset])
    assert len(calls) == 3  # the hidden marker is never read

    cache_file = tmp_path / "cache" / "fingerprints.json"
    cache = json.loads(cache_file.read_text())
    image = (dataset / "case0" / "image.nii.gz").resolve()
    size, mtime_ns, digest = cache[str(image)]
    assert size == image.stat().st_size and mtime_ns == image.stat().st_mtime_ns
    assert digest == hashlib.sha256(image.read_bytes()).hexdigest()
    assert [p.name for p in cache_file.parent.iterdir()] == ["fingerprints.json"]  # no temp files left

    calls.clear()
    assert record.content_hash([dataset]) == first
    assert calls == []  # only stat()ed

    _write(dataset / "case1" / "image.nii.gz", b"second casf", _OLD + 5)
    record.content_hash([dataset])
    assert [p.name for p in calls] == ["image.nii.gz"]  # only the changed file is re-read

    # A file written just now is hashed but not memoised (mtime granularity safety).
    calls.clear()
    fresh = dataset / "case2" / "image.nii.gz"
    fresh.parent.mkdir()
    fresh.write_bytes(b"fresh")
    record.content_hash([dataset])
    record.content_hash([dataset])
    assert calls == [fresh.resolve(), fresh.resolve()]


def test_content_hash_survives_corrupt_cache_and_rejects_missing(dataset: Path, tmp_path: Path):
    first = record.content_hash([dataset])
    cache_file = tmp_path / "cache" / "fingerprints.json"
    cache_file.write_text("{not json")
    assert record.content_hash([dataset]) == first
    assert json.loads(cache_file.read_text())  # rewritten whole
    with pytest.raises(FileNotFoundError):
        record.content_hash([tmp_path / "nope"])


# ----------------------------------------------------------------------------- git_state


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    return subprocess.run([*cmd, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_state_in_and_outside_a_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert record.git_state(repo) == {"git.commit": "unknown", "git.dirty": "false"}  # no commit yet

    (repo / "a.txt").write_text("one\n")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    sha = _git(repo, "rev-parse", "HEAD").strip()
    assert record.git_state(repo) == {"git.commit": sha, "git.dirty": "false"}
    assert record.git_state(repo / "a.txt")["git.commit"] == sha

    (repo / "a.txt").write_text("two\n")
    assert record.git_state(repo) == {"git.commit": sha, "git.dirty": "true"}
    _git(repo, "checkout", "-q", "--", "a.txt")
    (repo / "new.py").write_text("x = 1\n")
    assert record.git_state(repo)["git.dirty"] == "true"  # untracked files count

    plain = tmp_path / "plain"
    plain.mkdir()
    unknown = {"git.commit": "unknown", "git.dirty": "unknown"}
    assert record.git_state(plain) == unknown
    assert record.git_state(tmp_path / "missing") == unknown


def test_git_state_without_git(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", "")
    assert record.git_state() == {"git.commit": "unknown", "git.dirty": "unknown"}


# ----------------------------------------------------------------------------- locations


def test_default_tracking_uri_points_into_the_repo(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MEDSEG_MLFLOW_DIR")
    root = Path(medseg_monai.__file__).resolve().parents[1]
    assert tracking.project_root() == root
    assert tracking.mlflow_dir() == root / "mlflow"
    assert tracking.default_tracking_uri() == f"sqlite:///{root}/mlflow/mlflow.db"
    assert tracking.default_tracking_uri().startswith("sqlite:////")


def test_mlflow_dir_override_and_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = tmp_path / "mlflow"
    assert tracking.mlflow_dir() == store
    assert tracking.default_tracking_uri() == f"sqlite:///{store}/mlflow.db"
    assert not store.exists()  # default_tracking_uri creates nothing
    assert tracking.tracking_uri() == f"sqlite:///{store}/mlflow.db"
    assert (store / "artifacts").is_dir()

    other = tmp_path / "other"
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(other))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-server:5000")
    assert tracking.tracking_uri() == "http://team-server:5000"
    assert not other.exists()


# ----------------------------------------------------------------------------- tags


def test_device_description_cpu():
    assert record.device_description("cpu") == "cpu"
    assert record.device_description(torch.device("cpu")) == "cpu"
    auto = record.device_description()
    if torch.cuda.is_available():
        assert auto.startswith("cuda:") and "(" in auto
    else:
        assert auto == "cpu"


def test_run_tags(dataset: Path, frozen_git: dict[str, str]):
    tags = record.run_tags("toy", "synthetic", [dataset], "quick", device="cpu")
    assert tags == {
        **frozen_git,
        "dataset.id": "toy",
        "dataset.hash": record.content_hash([dataset]),
        "dataset.kind": "synthetic",
        "profile": "quick",
        "device": "cpu",
        "version.python": ".".join(map(str, sys.version_info[:3])),
        "version.torch": torch.__version__,
        "version.monai": metadata.version("monai"),
        "version.mlflow": mlflow.__version__,
        "version.numpy": np.__version__,
        "version.pytorch_ignite": metadata.version("pytorch-ignite"),
        "version.medseg_monai": medseg_monai.__version__,
    }
    assert tags["git.dirty"] in {"true", "false", "unknown"}
    with pytest.raises(ValueError, match="dataset_kind"):
        record.run_tags("toy", "fake", [dataset], "quick")


# ----------------------------------------------------------------------------- sqlite runs


def _tags(dataset: Path) -> dict[str, str]:
    return record.run_tags("toy", "synthetic", [dataset], "default")


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking.tracking_uri())


def test_run_on_local_sqlite_store(dataset: Path, tmp_path: Path, frozen_git: dict[str, str]):
    store = tmp_path / "mlflow"
    params = {"optim": {"lr": 0.01, "name": "adam"}, "long": "z" * 7000}
    params["grid"] = {f"p{i:03d}": i for i in range(150)}  # more than one log_batch
    tags = {
        **record.run_tags("toy", "synthetic", [dataset], "quick", device="cpu"),
        "variant": "unet",
        "seed": 0,
    }
    with tracking.start_run("toy-study", "unet-seed0", tags=tags, params=params) as active:
        assert isinstance(active, mlflow.ActiveRun)
        assert mlflow.active_run().info.run_id == active.info.run_id
        mlflow.log_metric("dice", 0.75, step=1)
        mlflow.log_text("hello", "notes/hello.txt")
    assert mlflow.active_run() is None
    assert mlflow.get_tracking_uri() == f"sqlite:///{store}/mlflow.db"

    client = _client()
    run = client.get_run(active.info.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    expected = record.run_tags("toy", "synthetic", [dataset], "quick", device="cpu")
    assert {k: tags[k] for k in expected} == expected
    assert tags["git.commit"] == frozen_git["git.commit"]
    assert tags["mlflow.runName"] == "unet-seed0"
    assert tags["variant"] == "unet" and tags["seed"] == "0"

    assert run.data.params["optim.lr"] == "0.01"
    assert run.data.params["optim.name"] == "adam"
    assert run.data.params["long"] == "z" * 6000
    assert run.data.params["grid.p149"] == "149"
    assert len(run.data.params) == 153
    assert run.data.metrics == {"dice": 0.75}

    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "toy-study"
    assert exp.artifact_location == (store / "artifacts" / "toy-study").as_uri()
    landed = store / "artifacts" / "toy-study" / run.info.run_id / "artifacts" / "notes" / "hello.txt"
    assert landed.read_text() == "hello"

    # Same experiment for the next (variant, seed).
    tags = record.run_tags("toy", "synthetic", [dataset], "default")
    with tracking.start_run("toy-study", "unet-seed1", tags=tags) as second:
        pass
    assert client.get_run(second.info.run_id).info.experiment_id == run.info.experiment_id
    assert client.get_run(second.info.run_id).data.tags["profile"] == "default"


def test_failed_run_ends_failed(dataset: Path):
    with (
        pytest.raises(RuntimeError, match="diverged"),
        tracking.start_run("toy-study", "boom", tags=_tags(dataset)) as active,
    ):
        mlflow.log_metric("loss", float("nan"))
        raise RuntimeError("diverged")
    assert mlflow.active_run() is None
    assert _client().get_run(active.info.run_id).info.status == "FAILED"


def test_param_logging_failure_marks_run_failed(dataset: Path, monkeypatch: pytest.MonkeyPatch):
    def broken(self, *args, **kwargs):
        raise OSError("store went away")

    body_ran = False
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", broken)
        with (
            pytest.raises(OSError, match="store went away"),
            tracking.start_run("toy-study", "no-params", tags=_tags(dataset), params={"a": 1}),
        ):
            body_ran = True
    assert not body_ran
    runs = _client().search_runs([tracking.ensure_experiment("toy-study")])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_bad_dataset_fails_before_any_run(tmp_path: Path):
    # tags are computed before start_run: a missing dataset stops there and no experiment is made
    with pytest.raises(FileNotFoundError):
        record.run_tags("toy", "real", [tmp_path / "absent"], "default")
    assert _client().get_experiment_by_name("toy-study") is None


def test_record_tags_match_run_tags(dataset: Path, frozen_git: dict[str, str]):
    # the run record (bundle.prepare_run's run.json) and a fresh computation give the same tags
    rec = {
        "git": frozen_git,
        "dataset": {"id": "toy", "kind": "synthetic", "hash": record.content_hash([dataset])},
        "profile": "quick",
        "device": "cpu",
        "versions": record.library_versions(),
    }
    assert tracking.record_tags(rec) == record.run_tags("toy", "synthetic", [dataset], "quick", device="cpu")
    with pytest.raises(ValueError, match="dataset kind"):
        tracking.record_tags({**rec, "dataset": {**rec["dataset"], "kind": "fake"}})


def test_ensure_experiment_idempotent_and_restores_deleted(tmp_path: Path):
    client = _client()
    exp_id = tracking.ensure_experiment("a/b study", client)
    assert tracking.ensure_experiment("a/b study", client) == exp_id
    location = client.get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "mlflow" / "artifacts" / "a_b_study").as_uri()  # safe folder name
    client.delete_experiment(exp_id)
    assert client.get_experiment(exp_id).lifecycle_stage == "deleted"
    assert tracking.ensure_experiment("a/b study") == exp_id
    assert client.get_experiment(exp_id).lifecycle_stage == "active"


# ----------------------------------------------------------------------------- real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_options() -> set[str]:
    try:
        from mlflow.cli import server as server_command
    except ImportError:  # pragma: no cover
        return set()
    return {opt for param in server_command.params for opt in param.opts}


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (uvicorn workers included); kill it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    # The server process is gone; make sure none of its children survive it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite backend and proxied artifacts."""
    base = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{base / 'srv.db'}",
        "--artifacts-destination",
        str(base / "art"),
    ]
    options = _server_options()
    if "--workers" in options:
        cmd += ["--workers", "1"]
    if "--allowed-hosts" in options:
        cmd += ["--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"]
    env = {k: v for k, v in os.environ.items() if k not in _MLFLOW_ENV}
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no huey job-runner processes
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    log_path = base / "server.log"
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with opener.open(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > 60:
                pytest.fail(f"mlflow server not healthy after 60 s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield {"url": url, "artifacts": base / "art", "startup_s": time.monotonic() - started}
    finally:
        _stop(proc)


@pytest.mark.slow
def test_round_trip_through_a_real_server(
    mlflow_server: dict,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    frozen_git: dict[str, str],
):
    url = mlflow_server["url"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    report = _write(tmp_path / "report.json", b'{"dice": 0.5}')

    tags = record.run_tags("toy", "synthetic", [dataset], "paper")
    with tracking.start_run(
        "server-study", "unet-seed0", tags=tags, params={"model": {"name": "unet"}, "epochs": 2}
    ) as active:
        mlflow.log_metric("dice", 0.5, step=2)
        mlflow.log_artifact(str(report), artifact_path="eval")
    assert mlflow.get_tracking_uri() == url

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(active.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset.id"] == "toy"
    assert run.data.tags["dataset.hash"] == record.content_hash([dataset])
    assert run.data.tags["profile"] == "paper"
    assert run.data.tags["device"] == record.device_description()
    assert run.data.tags["version.mlflow"] == mlflow.__version__
    assert {k: run.data.tags[k] for k in frozen_git} == frozen_git
    assert run.data.tags["mlflow.runName"] == "unet-seed0"
    assert run.data.params == {"model.name": "unet", "epochs": "2"}
    assert run.data.metrics == {"dice": 0.5}
    history = client.get_metric_history(run.info.run_id, "dice")
    assert [(m.step, m.value) for m in history] == [(2, 0.5)]

    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["eval"]
    assert [f.path for f in client.list_artifacts(run.info.run_id, "eval")] == ["eval/report.json"]
    fetched = Path(client.download_artifacts(run.info.run_id, "eval/report.json", str(tmp_path / "dl")))
    assert fetched.read_bytes() == report.read_bytes()

    # The server chose the artifact location (proxied), nothing went to the local default store.
    exp = client.get_experiment(run.info.experiment_id)
    assert not exp.artifact_location.startswith("file:")
    assert list(mlflow_server["artifacts"].rglob("report.json"))
    assert not (tmp_path / "mlflow").exists()


_STARTER = """
import sys, time
from pathlib import Path
from medseg_monai import tracking
print("ready", flush=True)
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
with tracking.start_run("together", sys.argv[2], tags={}) as run:
    print("started", run.info.run_id, flush=True)
"""


def test_runs_started_together_on_a_new_local_store_all_start(tmp_path: Path) -> None:
    """Three processes opening one new sqlite store at the same instant: MLflow creates and migrates
    its tables in each, and without the lock in ``tracking.open_client`` some of them failed ("table
    experiments already exists", alembic's "expected to match one row"; 3 of 3 tries with two)."""
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STARTER, str(go), f"run{k}"],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(3)
    ]
    for proc in procs:  # every one imported and waits: then all open the store at once
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    outcomes = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outcomes, strict=True):
        assert proc.returncode == 0 and out.startswith("started"), err[-2000:]
    runs = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_runs(
        [tracking.ensure_experiment("together")]
    )
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]


def test_ui_links_open_each_experiment_on_its_runs_table(tmp_path: Path) -> None:
    """MLflow 3.17's UI opens an experiment on its GenAI page unless the link asks for the model
    training view (``make mlflow-ui`` prints these links)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = {name: tracking.ensure_experiment(name, client) for name in ("xray", "brats")}
    assert tracking.ui_links("http://127.0.0.1:5000/", client) == [
        ("brats", f"http://127.0.0.1:5000/#/experiments/{ids['brats']}?workflowType=machine_learning"),
        ("xray", f"http://127.0.0.1:5000/#/experiments/{ids['xray']}?workflowType=machine_learning"),
    ]


def test_a_tracking_uri_of_no_kind_mlflow_knows_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MLFLOW_TRACKING_URI=garbage://x`` ended a training in three tracebacks from MLflow's store
    registry; a URI of a kind MLflow opens (a bare path, sqlite, a server) is not refused here."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "garbage://user:secret@x")
    with pytest.raises(InputError) as refused:
        tracking.check_tracking_uri(timeout=1)
    message = str(refused.value)
    assert message.startswith("MLFLOW_TRACKING_URI=garbage://***@x: MLflow has no tracking store of the kind")
    assert "secret" not in message
    for uri in ("postgresql+psycopg2://127.0.0.1:9/db", "mysql://127.0.0.1:9/db"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert tracking.check_tracking_uri(timeout=1) == uri  # a database store: MLflow opens it later
