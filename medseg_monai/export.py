"""``python -m medseg_monai.export <run folder or MLflow run id> --output <dir>``: a trained run as a
self-contained MONAI model-zoo bundle that runs from any directory::

    <dir>/configs/inference.json   the run's inference, resolved: no macros into this repository
    <dir>/configs/evaluate.json    layered after inference.json: scores a Decathlon-style datalist
    <dir>/configs/metadata.json    zoo metadata: versions, the network's input and output, the run's
                                   metrics and dataset, which exports match and how closely
    <dir>/configs/logging.conf
    <dir>/models/model.pt          the best checkpoint's state dict
    <dir>/models/model.ts          TorchScript (scripted; traced on the run's input size where the
                                   network's Python does not compile: metadata says which)
    <dir>/models/model.onnx        ONNX (torch.onnx, batch and spatial axes dynamic)
    <dir>/docs/README.md           the run's figures and the study's method card
    <dir>/LICENSE

then, from anywhere: ``python -m monai.bundle run --config_file <dir>/configs/inference.json
--bundle_root <dir> --input_path <file or folder> --output_dir <folder>``.

The configs are the repository's, written back as values: each reference is inlined (or kept as a
top-level id where several parts share one object, e.g. the preprocessing ``Invertd`` undoes), each
expression evaluated and written as the value or the MONAI component it built. MONAI objects do not
keep their constructor arguments, so they are recorded as they are built (:func:`recording_builds`).
What still needs ``medseg_monai`` installed is listed in the metadata (``medseg_monai_components``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import enum
import importlib
import inspect
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg_monai.config import at_repo_root, config_parser, meta_files, recorded_settings
from medseg_monai.errors import InputError
from medseg_monai.networks import BatchOneConv3d
from medseg_monai.paths import project_root
from medseg_monai.record import library_versions
from medseg_monai.runtime import check_finite_weights
from medseg_monai.tracking import check_tracking_uri, open_client

__all__ = [
    "ATOL",
    "ENGINES",
    "RTOL",
    "EngineNetwork",
    "OnnxNetwork",
    "export_network",
    "export_run",
    "freeze_config",
    "main",
    "network_input",
    "plain_network",
    "recording_builds",
]

# exported networks match PyTorch within these (float32 on CPU: differences seen are ~1e-6)
RTOL = 1e-4
ATOL = 1e-4

# the exported evaluator's network: PyTorch, or models/model.onnx in ONNX Runtime (built only then,
# through medseg_monai's wrapper: ONNX Runtime is an optional package)
ONNX_NETWORK = {
    "_target_": "medseg_monai.export.OnnxNetwork",
    "path": "$@bundle_root + '/models/model.onnx'",
    "_disabled_": "$@engine != 'onnxruntime'",
}

# ids a user sets when running the exported bundle: kept as references, never inlined
RUNTIME_IDS = ("bundle_root", "input_path", "output_dir", "device", "amp")


# ----------------------------------------------------------------------------- writing configs back


@contextlib.contextmanager
def recording_builds() -> Iterator[dict[int, tuple[Any, type, tuple, dict]]]:
    """Record the constructor arguments of every MONAI transform, inferer and image reader built
    inside: ``{id(obj): (obj, class, args, kwargs)}`` (the object is kept so that ids stay unique).
    Their ``__new__`` sees the same arguments as ``__init__``: it is wrapped where a class defines
    one (e.g. MapTransform), set on the bases otherwise."""
    from monai.data import ImageReader
    from monai.inferers import Inferer
    from monai.transforms import Transform

    calls: dict[int, tuple[Any, type, tuple, dict]] = {}

    def recording(original: Any) -> Any:
        def new(cls: type, *args: Any, **kwargs: Any) -> Any:
            obj = original(cls, *args, **kwargs)
            calls[id(obj)] = (obj, cls, args, kwargs)  # the outermost call, with the arguments, is last
            return obj

        return staticmethod(new)

    classes, todo = [], [Transform, Inferer, ImageReader]
    while todo:
        cls = todo.pop()
        if cls not in classes:
            classes.append(cls)
            todo += cls.__subclasses__()
    saved = {c: vars(c)["__new__"] for c in classes if "__new__" in vars(c)}
    for base in (Transform, Inferer, ImageReader):
        saved.setdefault(base, _PLAIN_NEW)
    for cls, original in saved.items():
        cls.__new__ = recording(original.__func__ if isinstance(original, staticmethod) else original)
    try:
        yield calls
    finally:
        # restored by assignment, not del: CPython then keeps refusing arguments in object.__new__
        for cls, original in saved.items():
            cls.__new__ = original


def _plain_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    return object.__new__(cls)


_PLAIN_NEW = staticmethod(_plain_new)


def _public_path(obj: Any) -> str:
    """``module.name`` of a class or function by the shortest import that gives the same object
    (``monai.transforms.Spacingd``, not ``monai.transforms.spatial.dictionary.Spacingd``)."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or not name or "<" in name:
        raise ValueError(f"{obj!r} has no importable name")
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(prefix), name, None) is obj:
                return f"{prefix}.{name}"
        except ImportError:
            continue
    return f"{module}.{name}"


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, enum.Enum)
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


class _Freezer:
    """Writes ids of a parsed bundle config back as JSON values (see the module's docstring)."""

    def __init__(
        self, parser: Any, calls: Mapping[int, tuple[Any, type, tuple, dict]], renamed: dict[str, str]
    ):
        from monai.bundle.reference_resolver import ReferenceResolver

        self.parser = parser
        self.calls = calls
        self.renamed = dict(renamed)  # repository id -> exported id, kept as a reference
        self.promoted: dict[str, str] = {}  # repository id -> top-level exported id (shared objects)
        self.matcher = ReferenceResolver.id_matcher
        self.medseg: set[str] = set()  # medseg_monai names the written config still uses

    def _name(self, key: str) -> str:
        return self.renamed.get(key) or self.promoted.setdefault(key, re.sub(r"#|::", "_", key))

    def _resolved(self, key: str) -> Any:
        return self.parser.get_parsed_content(key)

    def _object_ids(self) -> dict[int, str]:
        found: dict[int, str] = {}
        for key, obj in self.parser.ref_resolver.resolved_content.items():
            if not _is_plain(obj) and not isinstance(obj, (list, tuple, dict)):
                found.setdefault(id(obj), key.replace("::", "#"))  # MONAI's separator, written as '#' here
        return found

    def node(self, raw: Any, key: str, top: bool = False) -> Any:
        """The raw config at ``key`` written back."""
        if not top and key in self.renamed:
            return "@" + self.renamed[key]
        if not top and key in self.promoted:
            return "@" + self.promoted[key]
        if isinstance(raw, dict):
            out = {}
            for k, v in raw.items():
                if k == "_target_":
                    out[k] = v
                    if isinstance(v, str) and v.startswith("medseg_monai."):
                        self.medseg.add(v)
                else:
                    out[k] = self.node(v, f"{key}#{k}")
            return out
        if isinstance(raw, list):
            return [self.node(v, f"{key}#{i}") for i, v in enumerate(raw)]
        if isinstance(raw, str) and raw.startswith("@"):
            ref = raw[1:]
            if ref in self.renamed or ref in self.promoted:
                return "@" + self._name(ref)
            value = self._resolved(ref)
            if _is_plain(value):
                return self.value(value, ref)
            return "@" + self._name(ref)
        if isinstance(raw, str) and raw.startswith("$"):
            return self.expression(raw, key)
        return raw

    def expression(self, raw: str, key: str) -> Any:
        refs = [m[1:] for m in self.matcher.findall(raw)]
        kept = [r for r in refs if r in self.renamed]
        if kept:  # depends on what the user sets: keep the text, other references as their values
            text = raw
            for ref in sorted(set(refs), key=len, reverse=True):
                if ref in self.renamed:
                    replacement = "@" + self.renamed[ref]
                else:
                    value = self._resolved(ref)
                    if not _is_plain(value):
                        raise InputError(
                            f"cannot write '{key}' back: '{raw}' needs @{ref}, not a plain value"
                        )
                    replacement = repr(value)
                text = re.sub(rf"@{re.escape(ref)}(?![\w#])", lambda _m, r=replacement: r, text)
            if "medseg_monai" in text:
                self.medseg.update(re.findall(r"medseg_monai(?:\.\w+)+", text))
            return text
        if not refs and "medseg_monai" not in raw:
            return raw  # e.g. $torch.uint8, $monai.handlers.from_engine([...]): MONAI alone runs it
        return self.value(self._resolved(key), key)

    def value(self, obj: Any, where: str) -> Any:
        """An evaluated object written as JSON: a value, a reference to a shared id, a component."""
        if isinstance(obj, enum.Enum):
            return self.value(obj.value, where)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, torch.dtype):
            return f"${obj}"
        if isinstance(obj, (list, tuple)):
            return [self.value(v, f"{where}#{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: self.value(v, f"{where}#{k}") for k, v in obj.items()}
            if _is_plain(list(obj.values())) and ast.literal_eval(repr(obj)) == obj:  # e.g. {1: 2}: int keys
                return f"${obj!r}"
        shared = self._object_ids().get(id(obj))
        if shared is not None and shared != where:
            return "@" + self._name(shared)
        if id(obj) in self.calls:
            _, cls, args, kwargs = self.calls[id(obj)]
            bound = inspect.signature(cls).bind(*args, **kwargs)
            target = _public_path(cls)
            if target.startswith("medseg_monai."):
                self.medseg.add(target)
            out: dict[str, Any] = {"_target_": target}
            for name, arg in bound.arguments.items():
                kind = inspect.signature(cls).parameters[name].kind
                if kind == inspect.Parameter.VAR_KEYWORD:
                    out.update({k: self.value(v, f"{where}#{k}") for k, v in arg.items()})
                elif kind == inspect.Parameter.VAR_POSITIONAL:
                    raise InputError(f"cannot write '{where}' back: {target} takes *{name}")
                else:
                    out[name] = self.value(arg, f"{where}#{name}")
            return out
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            try:
                path = _public_path(obj)
            except ValueError:
                path = None
            if path is not None:
                if path.startswith("medseg_monai."):
                    self.medseg.add(path)
                return f"${path}"
        raise InputError(f"cannot write '{where}' back as a config: {type(obj).__name__} {str(obj)[:60]!r}")

    def freeze(self, keys: Mapping[str, str]) -> dict[str, Any]:
        """``{exported id: written value}`` for ``keys`` (repository id -> exported id), then every
        shared object they reference, until none is left."""
        out = {new: self.node(self.parser[old], old, top=True) for old, new in keys.items()}
        done: set[str] = set()
        while pending := [k for k in self.promoted if k not in done]:
            for key in pending:
                done.add(key)
                out[self.promoted[key]] = self.node(self.parser[key], key, top=True)
        return out


def freeze_config(parser: Any, keys: Mapping[str, str], runtime: Mapping[str, str]) -> tuple[dict, list[str]]:
    """Ids ``keys`` (repository id -> exported id) of ``parser`` written back as a config of values,
    with references to ``runtime`` ids kept (repository id -> exported id), and the medseg_monai
    names it still uses. Build nothing in ``parser`` before: the builds are recorded here. Two
    passes, so that an object found shared late is a reference everywhere."""
    with recording_builds() as calls:
        first = _Freezer(parser, calls, {**runtime, **keys})
        first.freeze(keys)
        second = _Freezer(parser, calls, {**runtime, **keys})
        second.promoted = dict(first.promoted)
        out = second.freeze(keys)
    return out, sorted(second.medseg)


# ----------------------------------------------------------------------------- networks


class OnnxNetwork(torch.nn.Module):
    """An ONNX model in ONNX Runtime, called like the network it was exported from (a tensor in,
    a tensor on the input's device out), so that MONAI's inferers can use it."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})[0]
        return torch.from_numpy(out).to(x.device)


ENGINES = ("torch", "bf16", "onnxruntime")


def plain_network(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` as its config builds it: out of DDP, oneDNN's batch-one 3D convolutions
    (:func:`medseg_monai.networks.fast_cpu_conv3d`) back to ``nn.Conv3d``, which export as such."""
    import copy

    plain = copy.deepcopy(getattr(net, "module", net))
    for module in plain.modules():
        if type(module) is BatchOneConv3d:
            module.__class__ = torch.nn.Conv3d
    return plain


class EngineNetwork(torch.nn.Module):
    """The network as an inference engine runs it: ``torch`` (eager, float32 on the CPU), ``bf16``
    (eager under bfloat16 autocast) or ``onnxruntime`` (the network's weights when first called,
    exported to ONNX in a temporary file, run by ONNX Runtime on the CPU). Weights load into
    ``network`` as usual (the bundle's CheckpointLoader), before the first call."""

    def __init__(self, network: torch.nn.Module, engine: str = "torch", threads: int | None = None) -> None:
        super().__init__()
        if engine not in ENGINES:
            raise InputError(f"engine '{engine}' is not one of {', '.join(ENGINES)}")
        if engine == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise InputError("engine onnxruntime needs ONNX Runtime: pip install -e .[deploy]") from None
        self.network, self.engine, self.threads = network, engine, threads
        self._onnx: OnnxNetwork | None = None
        self._folder: tempfile.TemporaryDirectory | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.network(x).float()
        if self.engine == "onnxruntime":
            if self._onnx is None:
                self._folder = tempfile.TemporaryDirectory()
                path = Path(self._folder.name) / "model.onnx"
                _to_onnx(plain_network(self.network).eval().cpu(), x[:1].detach().cpu().float(), path)
                self._onnx = OnnxNetwork(path, self.threads)
            return self._onnx(x)
        return self.network(x)


def _to_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, verify: bool = False) -> None:
    """``net`` as ONNX (TorchScript-based torch.onnx exporter, opset 17; batch and spatial axes
    dynamic), checked in ONNX Runtime against PyTorch on ``example`` with ``verify``."""
    import warnings

    from monai.networks.utils import convert_to_onnx

    names = {0: "batch", **{d: f"spatial_{d - 1}" for d in range(2, example.ndim)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        convert_to_onnx(
            net,
            [example],
            input_names=["image"],
            output_names=["pred"],
            dynamic_axes={"image": names, "pred": names},
            filename=str(path),
            verify=verify,
            use_ort=True,
            rtol=RTOL,
            atol=ATOL,
            use_trace=True,
            dynamo=False,
            opset_version=17,
        )


def export_network(net: torch.nn.Module, example: torch.Tensor, models_dir: Path) -> dict[str, Any]:
    """``models/model.ts`` and ``models/model.onnx`` of ``net`` (eval mode), each checked against
    PyTorch on ``example`` within :data:`RTOL` / :data:`ATOL` (MONAI's converters verify them);
    how the TorchScript was made and the largest differences."""
    from monai.networks.utils import convert_to_torchscript

    net = net.eval().cpu()
    example = example.detach().cpu().float()
    models_dir.mkdir(parents=True, exist_ok=True)
    ts_path, onnx_path = models_dir / "model.ts", models_dir / "model.onnx"
    try:
        ts = convert_to_torchscript(net, str(ts_path), verify=True, inputs=[example], rtol=RTOL, atol=ATOL)
        how = "script"
    except Exception as e:  # a construct TorchScript's compiler refuses: trace on the example's size
        ts = convert_to_torchscript(
            net, str(ts_path), verify=True, inputs=[example], rtol=RTOL, atol=ATOL, use_trace=True
        )
        how = f"trace ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})"
    _to_onnx(net, example, onnx_path, verify=True)
    with torch.no_grad():
        ref = net(example)
        ts_diff = (torch.jit.load(str(ts_path))(example) - ref).abs().max().item()
        onnx_diff = (OnnxNetwork(onnx_path)(example) - ref).abs().max().item()
    del ts
    return {"torchscript": how, "max_abs_diff": {"torchscript": ts_diff, "onnx": onnx_diff}}


# ----------------------------------------------------------------------------- runs


def run_folder(ref: str) -> Path:
    """The folder of a run: ``ref`` itself, or the ``output_dir`` tag of the MLflow run ``ref`` (an
    id) in the configured tracking store."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise InputError(f"{ref}: no model.pt in it (a run folder holds its best checkpoint there)")
        return path.resolve()
    if "/" in ref or not re.fullmatch(r"[0-9a-f]{32}", ref):
        raise InputError(f"{ref}: neither a run folder nor an MLflow run id")
    from mlflow.exceptions import MlflowException

    uri = check_tracking_uri()
    try:
        run = open_client(uri).get_run(ref)
    except MlflowException:
        raise InputError(f"{ref}: no such MLflow run in {uri}") from None
    folder = run.data.tags.get("output_dir")
    if not folder or not (Path(folder) / "model.pt").is_file():
        raise InputError(f"MLflow run {ref}: its run folder ({folder}) with model.pt is not on this machine")
    return Path(folder)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def network_input(parser: Any, case: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A case as the bundle's network sees it: (the whole image after the bundle's validation
    preprocessing, with a batch axis; the first window its ``val_inferer`` gives the network)."""
    item = parser.get_parsed_content("val_transform")(dict(case))
    image = torch.as_tensor(item["image"]).float()[None]
    windows: list[torch.Tensor] = []

    def first_window(x: torch.Tensor) -> torch.Tensor:
        windows.append(x.detach().clone())
        return torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=x.dtype)

    with torch.no_grad():
        parser.get_parsed_content("val_inferer")(image, first_window)
    return image, windows[0][:1]


def _example_input(parser: Any, run_dir: Path) -> torch.Tensor:
    """The first network input of one of the run's own cases (its datalist.json)."""
    datalist = _read_json(run_dir / "datalist.json")
    cases = datalist.get("validation") or datalist.get("test") or datalist.get("training") or []
    if not cases:
        raise InputError(f"{run_dir / 'datalist.json'}: no case to run the network on")
    try:
        return network_input(parser, cases[0])[1]
    except Exception as e:
        raise InputError(
            f"the run's case {cases[0].get('case_id', '?')} is not readable here ({e}): the export runs the "
            "network on one of the run's cases"
        ) from None


def _study_and_files(run_dir: Path) -> tuple[str, list[str], dict[str, Any]]:
    record = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    study = record.get("study") if isinstance(record, dict) else None
    if not study:
        raise InputError(f"{run_dir}: no run.json naming its study")
    found = recorded_settings(str(study), "inference", run_dir / "model.pt")
    if found is None:
        raise InputError(f"{run_dir}: no config.json (the settings the run was trained with)")
    files, overrides = found
    return str(study), files, overrides


def _metadata(
    study: str, files: list[str], run_dir: Path, example: torch.Tensor, checks: dict[str, Any],
    medseg: list[str], out_channels: int,
) -> dict[str, Any]:  # fmt: skip
    from monai.bundle import ConfigParser

    with at_repo_root():
        meta = ConfigParser()
        meta.read_meta([str(project_root() / m) for m in meta_files(files)])
        meta = meta.get("_meta_")
    versions = library_versions()
    record = _read_json(run_dir / "run.json")
    meta["monai_version"] = versions.get("monai", meta.get("monai_version"))
    meta["pytorch_version"] = torch.__version__.split("+")[0]
    meta["numpy_version"] = np.__version__
    required = {k: v for k, v in meta.get("required_packages_version", {}).items() if k != "mlflow"}
    if not medseg:
        required.pop("medseg-monai", None)
    meta["required_packages_version"] = required
    meta["optional_packages_version"] = {"onnxruntime": _version("onnxruntime")}
    version = meta.get("version", "0.1.0")
    meta.setdefault("changelog", {})
    metrics = _read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    split = next((p.name[5:-9] for p in sorted(run_dir.glob("eval_*_run.json"))), None)
    fmt = meta["network_data_format"]
    spatial = list(example.shape[2:])
    fmt["inputs"]["image"]["num_channels"] = int(example.shape[1])
    fmt["inputs"]["image"]["spatial_shape"] = spatial
    fmt["outputs"]["pred"]["num_channels"] = out_channels
    fmt["outputs"]["pred"]["spatial_shape"] = spatial
    dataset = record.get("dataset", {})
    meta["eval_metrics"] = {k: round(float(v), 6) for k, v in (metrics.get("mean") or {}).items()}
    meta["exported_run"] = {
        "study": study,
        "experiment": record.get("experiment"),
        "profile": record.get("profile"),
        "seed": record.get("seed"),
        "dataset": {k: dataset.get(k) for k in ("id", "kind", "hash")},
        "eval_split": split,
        "git": record.get("git"),
        "run_folder": str(run_dir),
        "mlflow_run_id": _mlflow_run_id(run_dir),
    }
    meta["exports"] = {**checks, "rtol": RTOL, "atol": ATOL, "checked_on": list(example.shape)}
    meta["medseg_monai_components"] = medseg
    meta["changelog"] = {version: f"exported from run {run_dir.name} ({record.get('experiment')}, "
                         f"{record.get('profile')} profile, dataset {dataset.get('id')})", **meta["changelog"]}  # fmt: skip
    meta["version"] = version
    return meta


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _mlflow_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "mlflow_run.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _readme(study: str, meta: dict[str, Any], run_dir: Path, docs: Path) -> str:
    run = meta["exported_run"]
    lines = [
        f"# {meta.get('name', study)}: exported run",
        "",
        f"Run `{run_dir.name}` of the {study} study: experiment `{run['experiment']}`, profile "
        f"`{run['profile']}`, seed {run['seed']}, dataset `{run['dataset']['id']}` ({run['dataset']['kind']}, "
        f"content hash {run['dataset']['hash']}); MLflow run {run['mlflow_run_id']}; git {run.get('git')}.",
        "",
        "## Use",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\",
        "    --input_path <file or folder> --output_dir predictions/",
        "python -m monai.bundle run --config_file \"['configs/inference.json','configs/evaluate.json']\" \\",
        "    --bundle_root . --datalist_file <datalist.json> --data_list_key test --output_dir eval/",
        "python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\",
        "    --config_file configs/inference.json",
        "```",
        "",
        "`--engine onnxruntime` runs `models/model.onnx` in ONNX Runtime instead of PyTorch (CPU).",
        f"Needs `monai` and `torch`; `medseg_monai` components still used: {', '.join(meta['medseg_monai_components']) or 'none'}.",
        "",
        "## The run's figures",
        "",
    ]
    if meta["eval_metrics"]:
        split = run.get("eval_split") or "?"
        lines += [f"Evaluation on the `{split}` split:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in meta["eval_metrics"].items()]
    else:
        lines.append("The run was not evaluated (no metrics.json): `python -m medseg_monai.bundle "
                     f"{study} --mode evaluate --ckpt_path {run_dir}/model.pt`.")  # fmt: skip
    exports = meta["exports"]
    lines += [
        "",
        f"Exports checked against PyTorch on an input of shape {exports['checked_on']} (rtol {RTOL}, "
        f"atol {ATOL}): TorchScript by {exports['torchscript'].split(' (')[0]}, largest difference "
        f"{exports['max_abs_diff']['torchscript']:.2e}; ONNX {exports['max_abs_diff']['onnx']:.2e}.",
        "",
    ]
    for png in sorted(run_dir.glob("*.png")):
        shutil.copy(png, docs / png.name)
        lines += [f"![{png.stem}]({png.name})", ""]
    card = project_root() / "bundles" / study / "docs" / "README.md"
    if card.is_file():
        lines += ["## Method card (from the repository)", "", card.read_text()]
    return "\n".join(lines)


def export_run(ref: str, output: str | Path) -> Path:
    """Write the zoo bundle of run ``ref`` (a run folder or an MLflow run id) to ``output``."""
    run_dir = run_folder(ref)
    study, files, overrides = _study_and_files(run_dir)
    out = Path(output).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not empty (export into a new folder)")
    root = project_root()
    parser = config_parser([str(root / f) for f in files], {**overrides, "input_path": ""})
    runtime = {k: k for k in RUNTIME_IDS}
    infer_keys = {
        "network_def": "network_def",
        "infer_preprocessing": "preprocessing",
        "val_inferer": "inferer",
        "infer_postprocessing": "postprocessing",
        "infer_datalist": "datalist",
    }
    inference, medseg = freeze_config(parser, infer_keys, runtime)
    net = parser.get_parsed_content("network_def")
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    check_finite_weights(state, run_dir / "model.pt")
    net.load_state_dict(state)
    window = _example_input(parser, run_dir)
    out_channels = int(parser.get_parsed_content("num_classes"))

    eval_parser = config_parser([str(root / f) for f in files], {**overrides, "input_path": ""})
    eval_keys = {
        "eval_transform": "preprocessing",
        "eval_postprocessing": "postprocessing",
        "key_metric": "key_metric",
        "additional_metrics": "additional_metrics",
    }
    evaluate, eval_medseg = freeze_config(eval_parser, eval_keys, {**runtime, "val_inferer": "inferer"})

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        staging = Path(tmp)
        for sub in ("configs", "models", "docs"):
            (staging / sub).mkdir()
        torch.save(net.state_dict(), staging / "models" / "model.pt")
        checks = export_network(net, window, staging / "models")
        components = sorted(set(medseg) | set(eval_medseg))
        meta = _metadata(study, files, run_dir, window, checks, components, out_channels)
        _write_json(staging / "configs" / "inference.json", _inference_config(inference, medseg))
        _write_json(staging / "configs" / "evaluate.json", _evaluate_config(evaluate, eval_medseg))
        _write_json(staging / "configs" / "metadata.json", meta)
        shutil.copy(
            root / "bundles" / study / "configs" / "logging.conf", staging / "configs" / "logging.conf"
        )
        shutil.copy(root / "LICENSE", staging / "LICENSE")
        (staging / "docs" / "README.md").write_text(_readme(study, meta, run_dir, staging / "docs"))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), out)
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _imports(medseg: Sequence[str]) -> list[str]:
    return ["$import os", "$import torch", "$import monai"] + (["$import medseg_monai"] if medseg else [])


def _evaluator(**settings: str) -> dict[str, str]:
    """The SupervisedEvaluator both exported configs run; ``settings`` add to or replace its entries."""
    return {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@engine_network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": "@amp",
        **settings,
    }


def _inference_config(parts: dict[str, Any], medseg: Sequence[str]) -> dict[str, Any]:
    """The zoo's inference.json around the written-back parts."""
    return {
        "imports": _imports(medseg),
        "bundle_root": ".",
        "input_path": "",
        "output_dir": "$@bundle_root + '/predictions'",
        "engine": "torch",  # torch, or onnxruntime: models/model.onnx on the CPU
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() and @engine == 'torch' else 'cpu')",
        "amp": "$torch.cuda.is_available() and @engine == 'torch'",
        **{
            k: v
            for k, v in parts.items()
            if k not in ("preprocessing", "postprocessing", "inferer", "datalist")
        },
        "network": "$@network_def.to(@device)",
        "onnx_network": ONNX_NETWORK,
        "engine_network": "$@onnx_network or @network",
        "datalist": parts["datalist"],
        "preprocessing": parts["preprocessing"],
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": parts["inferer"],
        "postprocessing": parts["postprocessing"],
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": _evaluator(),
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _evaluate_config(parts: dict[str, Any], medseg: Sequence[str]) -> dict[str, Any]:
    """evaluate.json, layered after inference.json: a Decathlon-style datalist of images and labels
    (the layout the study's dataset registry gives), the run's metrics, saved by MONAI's MetricsSaver."""
    return {
        "imports": _imports(medseg),
        "datalist_file": "",
        "data_list_key": "test",
        "dataset_dir": "$os.path.dirname(os.path.abspath(@datalist_file))",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$monai.data.load_decathlon_datalist(@datalist_file, True, @data_list_key, @dataset_dir)",
        **parts,
        "metric_saver": {
            "_target_": "MetricsSaver",
            "save_dir": "@output_dir",
            "metrics": "*",
            "metric_details": "*",
            "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
            "summary_ops": "*",
        },
        "evaluator": _evaluator(
            key_val_metric="@key_metric",
            additional_metrics="@additional_metrics",
            val_handlers="$@handlers + [@metric_saver]",
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medseg_monai.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run", help="a run folder (with model.pt, config.json, run.json) or an MLflow run id")
    parser.add_argument("--output", required=True, help="a new folder for the bundle")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run, args.output)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    diffs = meta["exports"]["max_abs_diff"]
    print(
        f"exported {args.run} to {out}: TorchScript ({meta['exports']['torchscript'].split(' (')[0]}) and ONNX "
        f"match PyTorch (largest differences {diffs['torchscript']:.1e}, {diffs['onnx']:.1e}); medseg_monai "
        f"components still used: {', '.join(meta['medseg_monai_components']) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
