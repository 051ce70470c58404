"""Runs and files from elsewhere are data, never code (issue #41, security): a run folder's recorded
config is read as plain values checked against the bundle's own configs, a training checkpoint is
loaded without unpickling code, a dataset layout stays inside its data root, an offline journal
uploads only its own folder's files to the store the user chose, and credentials in a tracking URI
never reach an error line.

Each refusal is checked for its exit status, its single ``error:`` line and what is left on disk."""

from __future__ import annotations

import base64
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine

from bundle_utils import error_lines, local_store_env, parse_study, run_python_module, write_toy_registry
from medseg_monai import tracking
from medseg_monai.config import command_line, config_files, recorded_settings, studies
from medseg_monai.errors import InputError
from medseg_monai.handlers import config_params
from medseg_monai.handlers.resume import TrainingCheckpoint
from medseg_monai.io import write_json
from medseg_monai.record import merged_config

TINY = {"image_size": 32, "dataset": "xray-synthetic"}


# ----------------------------------------------------------------------------- 1. a recorded config is data


def _record(
    folder: Path, argv: list[str], changes: dict[str, Any] | None = None, model: bool = False
) -> Path:
    """A run folder as a training leaves it: ``config.json`` (the merged config of ``argv``, a
    ``monai.bundle run`` command line, with ``changes`` at top level or at ``a#b`` ids), ``run.json``
    (its command) and ``model.pt`` (the xray quick network's weights when ``model``, else empty)."""
    config = merged_config(argv)
    assert config is not None
    for key, value in (changes or {}).items():
        *parents, last = key.split("#")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    write_json(config, folder / "config.json")
    write_json({"command": argv}, folder / "run.json")
    weights = parse_study("xray", profile="quick", **TINY).get_parsed_content("network_def").state_dict()
    torch.save(weights if model else {}, folder / "model.pt")
    return folder


def _training_argv(study: str = "xray", layer: str | None = None, **overrides: Any) -> list[str]:
    """The command line of a quick-profile training of ``study`` with the experiment file ``layer``."""
    return command_line(config_files(study, "train", layer, "quick"), **overrides)[2:]


def _experiments(study: str) -> list[str | None]:
    found = sorted(p.stem for p in Path(config_files(study)[0]).parent.glob("experiments/*.yaml"))
    return [None, *found]


@pytest.mark.parametrize(
    ("study", "experiment"), [(s, e) for s in studies() for e in _experiments(s)], ids=str
)
def test_a_record_is_rebuilt_from_the_bundles_own_files(
    tmp_path: Path, study: str, experiment: str | None
) -> None:
    argv = _training_argv(study, experiment, output_dir=str(tmp_path / "run"), seed=3, max_epochs=2)
    folder = _record(tmp_path / "run", argv)
    files, overrides = recorded_settings(study, "evaluate", folder / "model.pt")
    assert files == config_files(study, "evaluate", experiment, "quick")
    # output_dir is where the run was, not how it trained: its evaluation writes beside the checkpoint
    assert overrides == {"seed": 3, "max_epochs": 2}


def test_a_record_carries_its_plain_settings_nested_ones_too(tmp_path: Path) -> None:
    # a sweep entry of the grid: experiments/baseline.yaml under another name, one setting changed
    argv = _training_argv("xray", "baseline", experiment="train_size_005", train_size=5, **TINY)
    argv += ["--network_def#norm", "instance", "--data_root", str(tmp_path / "data")]
    folder = _record(tmp_path / "run", argv)
    files, overrides = recorded_settings("xray", "inference", folder / "model.pt")
    assert files == config_files("xray", "inference", "baseline", "quick")
    assert overrides == {
        "experiment": "train_size_005",
        "train_size": 5,
        "network_def#norm": "instance",
        "data_root": str(tmp_path / "data"),
        **TINY,
    }
    # without run.json the experiment and profile named in the record choose the files
    (folder / "run.json").unlink()
    assert recorded_settings("xray", "evaluate", folder / "model.pt")[0] == [
        *config_files("xray", profile="quick"),
        "bundles/xray/configs/evaluate.yaml",
    ]


def test_a_record_may_not_replace_a_computed_setting_by_a_mapping(tmp_path: Path) -> None:
    folder = _record(tmp_path / "run", _training_argv(**TINY), {"spec": {"class_names": ["a"]}})
    with pytest.raises(
        InputError, match=r"'spec' is \{'class_names': \['a'\]\} there, where the bundle computes"
    ):
        recorded_settings("xray", "evaluate", folder / "model.pt")


def _marker_code(marker: Path) -> str:
    return f"$__import__('os').mkdir({str(marker)!r}) or 'xray-synthetic'"


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("dataset", "code", "'dataset' holds \"$__import__"),  # a setting evaluation resolves
        ("unused", "code", "'unused' holds \"$__import__"),  # a key nothing reads (the tracker's params did)
        ("network_def", "target", "'network_def#_target_'"),  # instantiated by check_checkpoint
        ("class_set", "@study", "'class_set' holds '@study'"),
        ("data_root", "%bundles/xray/configs/quick.yaml#profile", "'data_root' holds '%bundles"),
        ("batch_size", "four", "'batch_size' is 'four' there"),  # plain, but not what the bundle takes
    ],
)
def test_evaluating_a_foreign_run_runs_none_of_its_code(
    tmp_path: Path, key: str, value: str, needle: str
) -> None:
    marker = tmp_path / "code-ran"
    changes: dict[str, Any] = {
        "code": {key: _marker_code(marker)},
        "target": {"network_def": {"_target_": "os.mkdir", "path": str(marker)}},
    }.get(value, {key: value})
    # the folder has no MLflow run: evaluation opens one and logs params (which evaluated 'unused')
    argv = _training_argv(**TINY, output_dir=str(tmp_path / "run"))
    folder = _record(tmp_path / "run", argv, changes, model=True)
    evaluation = tmp_path / "eval"
    args = [sys.executable, "-m", "medseg_monai.bundle", "xray", "--mode", "evaluate"]
    args += ["--ckpt_path", str(folder / "model.pt"), "--output_dir", str(evaluation)]
    result = run_python_module(args, local_store_env(tmp_path / "mlflow"), 600)
    assert not marker.exists(), "the record's code ran"
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert needle in lines[0] and str(folder / "config.json") in lines[0], lines[0]
    assert not evaluation.exists() and sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.pt",
        "run.json",
    ]


def test_a_recorded_study_is_a_bundle_name_never_a_path(tmp_path: Path) -> None:
    """``export`` takes the study from the run's ``run.json``: a study written as a path into the
    folder itself (``../../<folder>``) must not make the folder's own YAML "the bundle's files"."""
    marker = tmp_path / "code-ran"
    folder = tmp_path / "run"
    (folder / "configs").mkdir(parents=True)
    for name in ("train.yaml", "inference.yaml"):  # all the files export layers
        (folder / "configs" / name).write_text(f'network_def: "{_marker_code(marker)}"\n')
    study = os.path.relpath(folder, Path(config_files("xray")[0]).resolve().parents[2])
    write_json({"study": study, "command": []}, folder / "run.json")
    write_json({"network_def": "x"}, folder / "config.json")
    torch.save({}, folder / "model.pt")
    args = [sys.executable, "-m", "medseg_monai.export", str(folder), "--output", str(tmp_path / "out")]
    result = run_python_module(args, local_store_env(tmp_path / "mlflow"), 600)
    lines = error_lines(result)
    assert not marker.exists(), "the folder's YAML ran"
    assert result.returncode == 2 and len(lines) == 1 and "unknown study" in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_params_are_logged_as_written_never_evaluated(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    config = {
        "imports": ["$import os"],
        "lr": 0.1,
        "channels": ["flair", "t1"],
        "in_channels": "$len(@channels)",  # an expression is not a param
        "batch": "@lr",
        "evil": f"$__import__('os').mkdir({str(marker)!r})",
        "mixed": [1, "$2"],
        "network_def": {"_target_": "torch.nn.Identity"},  # the method's sections, as written
        "train": {"trainer": {}},
    }
    assert config_params(config) == {
        "lr": 0.1,
        "channels": ["flair", "t1"],
        "network_def": {"_target_": "torch.nn.Identity"},
    }
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. resuming unpickles no code


class _Payload:
    """Unpickled with ``weights_only=False``, it creates the folder ``path``: code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def _engine() -> Engine:
    engine = Engine(lambda e, b: None)
    engine.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # type: ignore[attr-defined]
    return engine


def test_a_checkpoint_holds_only_tensors_and_plain_values(tmp_path: Path) -> None:
    from monai.data import Dataset
    from monai.transforms import RandFlipd

    flip = RandFlipd("image", prob=0.5)
    data = Dataset([{"image": torch.zeros(1, 2, 2)}], transform=flip)
    flip.R.seed(5)
    engine = _engine()
    saver = TrainingCheckpoint(str(tmp_path), {"optimizer": engine.optimizer}, datasets=[data])
    saver.attach(engine)
    engine.run([0, 1], max_epochs=1)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # refuses anything else
    assert saved["objects"]["trainer"]["iteration"] == 2
    flip.R.seed(6)
    resumed = TrainingCheckpoint(str(tmp_path), {"optimizer": engine.optimizer}, datasets=[data], resume=True)
    resumed._load(_engine())
    assert flip.R.randint(1 << 30) == __import__("numpy").random.RandomState(5).randint(1 << 30)


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"objects": {}, "random": _Payload(marker)}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    resumed = TrainingCheckpoint(str(tmp_path), {}, resume=True)
    with pytest.raises(InputError) as refused:
        resumed._load(_engine())
    message = str(refused.value)
    assert "\n" not in message and "checkpoint.pt" in message and "mkdir" in message, message
    assert not marker.exists() and (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_resume_of_a_doctored_run_is_one_line_and_runs_nothing(tmp_path: Path) -> None:
    from bundle_utils import run_bundle

    out, store = tmp_path / "run", tmp_path / "mlflow"
    trained = run_bundle("xray", store, output_dir=out, max_epochs=1, **TINY)
    assert trained.returncode == 0, trained.stderr[-2000:]
    marker = tmp_path / "code-ran"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["random"]["python"] = _Payload(marker)
    torch.save(state, out / "checkpoint.pt")
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"}
    resumed = run_bundle("xray", store, output_dir=out, max_epochs=2, resume=True, **TINY)
    lines = error_lines(resumed)
    assert resumed.returncode != 0 and len(lines) == 1 and "mkdir" in lines[0], resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr and not marker.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"} == kept


# ----------------------------------------------------------------------------- 3. paths and uploads


def _toy_registry(tmp_path: Path, label: str) -> Path:
    # {gap} is empty in every case: '.{gap}.' passes the schema's '../' check and fills as '..'
    layout = {
        "case": "{subject}{gap:x?}/flair.nii.gz",
        "case_id": "{subject}",
        "images": {"flair": "{subject}/flair.nii.gz"},
        "label": label,
    }
    return write_toy_registry(tmp_path, {"layout": layout})


@pytest.mark.parametrize(
    "label", [".{gap}./outside/{subject}.nii.gz", "{subject}/.{gap}./.{gap}./outside/{subject}.nii.gz"]
)
def test_a_layout_cannot_reach_outside_its_data_root(
    tmp_path: Path, label: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from medseg_monai.data.cli import main

    monkeypatch.setenv("MEDSEG_REGISTRY", str(_toy_registry(tmp_path, label)))
    root = tmp_path / "toy"
    for name in ("1/flair.nii.gz", "../outside/1.nii.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    written = tmp_path / "datalist.json"
    assert main(["datalist", "toy", "--data_root", str(root), "-o", str(written)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset 'toy': case '1'"), lines
    assert "outside its data root" in lines[0] and str(root) in lines[0]
    assert not written.exists()


def _run_folder(
    tmp_path: Path, store_uri: str, journal_uri: str, artifacts: list[list[Any]]
) -> tuple[Path, str]:
    """A run in the local store ``store_uri`` and a folder whose offline journal names ``journal_uri``
    and ``artifacts``."""
    client = tracking.open_client(store_uri)
    run_id = client.create_run(tracking.ensure_experiment("toy", client)).info.run_id
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    write_json(
        {
            "run_id": run_id,
            "tracking_uri": journal_uri,
            "metrics": [["val_dice", 0.5, 1, 1]],
            "tags": {},
            "artifacts": artifacts,
            "status": "FINISHED",
        },
        folder / tracking.OFFLINE_RECORD,
    )
    return folder, run_id


class _Server:
    """A stand-in MLflow server on loopback: answers ``/health`` (with HTTP basic auth when
    ``credentials`` are set), 404 to the rest, and keeps every request it saw."""

    def __init__(self, credentials: str | None = None) -> None:
        seen: list[str] = []
        expected = None if credentials is None else "Basic " + base64.b64encode(credentials.encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                seen.append(self.path)
                ok = self.path == "/health" and self.headers.get("Authorization") == expected
                self.send_response(200 if ok else 401 if self.path == "/health" else 404)
                self.end_headers()
                self.wfile.write(b"OK" if ok else b"")

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.seen = seen
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server() -> Iterator[_Server]:
    server = _Server()
    yield server
    server.close()


def test_upload_goes_to_the_configured_store_never_to_the_journals(
    tmp_path: Path, fake_server: _Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    store = tracking.tracking_uri()
    folder, run_id = _run_folder(
        tmp_path, store, f"http://127.0.0.1:{fake_server.port}", [["metrics.json", None]]
    )
    assert tracking.main(["upload", str(tmp_path / "runs")]) == 0
    assert fake_server.seen == []  # not even asked whether it is up
    client = tracking.open_client(store)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]
    assert not (folder / tracking.OFFLINE_RECORD).exists()
    assert "uploaded 1 run(s)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../secret.txt", "link.txt", "/etc/hostname"])
def test_upload_sends_no_file_from_outside_the_run_folder(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    store = tracking.tracking_uri()
    folder, run_id = _run_folder(tmp_path, store, store, [["metrics.json", None], [name, None]])
    (folder.parent / "secret.txt").write_text("not yours")
    (folder / "link.txt").symlink_to(folder.parent / "secret.txt")
    capsys.readouterr()  # MLflow's lines on creating the store
    assert tracking.main(["upload", str(folder)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"'{name}'" in lines[0], lines
    assert "outside the run folder" in lines[0]
    client = tracking.open_client(store)
    run = client.get_run(run_id)  # nothing of the journal was sent
    assert run.info.status == "RUNNING" and not run.data.metrics and not client.list_artifacts(run_id)
    assert (folder / tracking.OFFLINE_RECORD).is_file()


def test_credentials_in_the_tracking_uri_never_reach_an_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = _Server()
    closed.close()  # a port nothing answers on
    uri = f"http://alice:s3cret@127.0.0.1:{closed.port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(InputError) as refused:
        tracking.check_tracking_uri(timeout=2)
    assert "s3cret" not in str(refused.value) and f"http://***@127.0.0.1:{closed.port}" in str(refused.value)
    folder, _ = _run_folder(tmp_path, f"sqlite:///{tmp_path}/m.db", uri, [])
    capsys.readouterr()  # MLflow's lines on creating the store
    assert tracking.main(["upload", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "s3cret" not in err, err
    assert (folder / tracking.OFFLINE_RECORD).is_file()
    # a training started against that server: one line, no password, nothing written
    out = tmp_path / "run"
    args = command_line(config_files("xray", profile="quick"), output_dir=str(out), **TINY)
    result = run_python_module(
        args, {**local_store_env(tmp_path / "mlflow"), "MLFLOW_TRACKING_URI": uri}, 300
    )
    lines = error_lines(result)
    assert result.returncode != 0 and len(lines) == 1 and "does not answer" in lines[0], result.stderr[-2000:]
    assert "s3cret" not in result.stderr + result.stdout and not (out / "run.json").exists()


def test_a_tracking_uri_with_credentials_is_accepted_when_its_server_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _Server(credentials="alice:s3cret")
    try:
        uri = f"http://alice:s3cret@127.0.0.1:{server.port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert tracking.check_tracking_uri(timeout=5) == uri
        assert server.seen == ["/health"]
    finally:
        server.close()
