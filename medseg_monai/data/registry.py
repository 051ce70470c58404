"""The dataset registry: ``datasets.json`` read, checked against its schema, and resolved.

``datasets.json`` is data only (nothing is evaluated). Every entry says where a dataset
comes from, how its cases are laid out on disk, its channels, what its label values mean
and how they map to training classes, and its default split. Synthetic entries name a
generator and borrow the layout and labels of the real dataset they imitate
(``layout_of``), so that one loading path serves both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from medseg_monai.errors import InputError
from medseg_monai.paths import project_root

__all__ = ["DatasetError", "DatasetSpec", "get_dataset", "list_datasets", "load_registry", "registry_path"]


class DatasetError(InputError):
    """Bad dataset input. The message is one line that names the dataset, file or key at fault."""


@dataclass(frozen=True)
class DatasetSpec:
    """One resolved ``datasets.json`` entry (synthetic entries carry their real twin's layout)."""

    id: str
    study: str
    kind: str
    description: str
    citation: str
    licence: str
    layout: dict[str, Any]
    labels: dict[str, Any]
    intensity: dict[str, Any]
    split: dict[str, Any]
    obtain: dict[str, str] = field(default_factory=dict)
    generator: dict[str, Any] | None = None
    layout_of: str | None = None

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    @property
    def channels(self) -> list[str]:
        """Channel names in their default order (the ``layout.images`` keys)."""
        return list(self.layout["images"])

    @property
    def structures(self) -> dict[int, str]:
        """Label value in the files -> structure name (masks are assigned these values)."""
        return {int(v): name for v, name in self.labels["structures"].items()}

    @property
    def mask_names(self) -> list[str]:
        """Structure names of per-structure mask files, in their stacking order ([] for label maps)."""
        return list(self.layout.get("masks", {}))

    def class_set(self, name: str = "default") -> dict[str, list[str]]:
        sets = self.labels["classes"]
        if name not in sets:
            raise DatasetError(f"dataset '{self.id}' has no class set '{name}' (known: {', '.join(sets)})")
        return sets[name]

    def class_names(self, class_set: str = "default") -> list[str]:
        """Class names by training index (0 is background)."""
        return list(self.class_set(class_set))

    def label_mapping(self, class_set: str = "default") -> dict[int, int]:
        """File label value -> training class index. Ignored and unlisted structures map to 0."""
        by_name = {name: value for value, name in self.structures.items()}
        mapping = dict.fromkeys(self.structures, 0)
        for index, sources in enumerate(self.class_set(class_set).values()):
            for structure in sources:
                mapping[by_name[structure]] = index
        return mapping

    def ignore_values(self) -> list[int]:
        """File label values excluded from loss and metrics (e.g. WMH 2017 label 2, other pathology)."""
        ignored = set(self.labels.get("ignore", []))
        return sorted(v for v, name in self.structures.items() if name in ignored)

    def mask_classes(self, class_set: str = "default") -> list[list[int]]:
        """For mask layouts: per foreground class (index 1, 2, ...), the indices of the stacked masks
        merged into it. Classes are painted in order, so a later class wins where masks overlap."""
        order = self.mask_names
        return [[order.index(s) for s in sources] for sources in list(self.class_set(class_set).values())[1:]]

    def regions(self) -> dict[str, list[int]]:
        """Evaluation region name -> file label values it unites (e.g. BraTS wt/tc/et)."""
        by_name = {name: value for value, name in self.structures.items()}
        return {r: sorted(by_name[s] for s in names) for r, names in self.labels.get("regions", {}).items()}


def registry_path() -> Path:
    """``$MEDSEG_REGISTRY`` or the project's ``datasets.json``."""
    env = os.environ.get("MEDSEG_REGISTRY")
    return Path(env).expanduser().resolve() if env else project_root() / "datasets.json"


@cache
def _schema() -> dict[str, Any]:
    return json.loads(resources.files("medseg_monai").joinpath("schemas/datasets.schema.json").read_text())


def _json_path(path: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _check_references(raw: dict[str, Any], where: Path) -> None:
    """What the schema cannot say: unique ids, ``layout_of`` targets, names that must exist."""
    entries = raw["datasets"]
    ids = [d["id"] for d in entries]
    real = {d["id"]: d for d in entries if d["kind"] == "real"}
    for i, d in enumerate(entries):
        at = f"{where}: $.datasets[{i}]"
        if ids.count(d["id"]) > 1:
            raise DatasetError(f"{at}.id: duplicate dataset id '{d['id']}'")
        if d["kind"] == "synthetic":
            if d["layout_of"] not in real:
                raise DatasetError(f"{at}.layout_of: '{d['layout_of']}' is not a real dataset id")
            continue
        layout, labels = d["layout"], d["labels"]
        structures = set(labels["structures"].values())
        for name in layout.get("masks", {}):
            if name not in structures:
                raise DatasetError(f"{at}.layout.masks.{name}: not a structure in labels.structures")
        for name in labels.get("ignore", []):
            if name not in structures:
                raise DatasetError(f"{at}.labels.ignore: unknown structure '{name}'")
        for set_name, classes in labels["classes"].items():
            for cls, sources in classes.items():
                for s in sources:
                    if s not in structures:
                        raise DatasetError(f"{at}.labels.classes.{set_name}.{cls}: unknown structure '{s}'")
                    if "masks" in layout and s not in layout["masks"]:
                        raise DatasetError(f"{at}.labels.classes.{set_name}.{cls}: '{s}' has no mask file")
        for region, sources in labels.get("regions", {}).items():
            for s in sources:
                if s not in structures:
                    raise DatasetError(f"{at}.labels.regions.{region}: unknown structure '{s}'")


def load_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """Read, validate and resolve a registry file; ``DatasetError`` names the JSON path at fault.

    The result is cached per file and modification time: a run asks for it dozens of times, and
    schema validation is the slow part."""
    where = (Path(path) if path is not None else registry_path()).resolve()
    try:
        mtime = where.stat().st_mtime_ns
    except FileNotFoundError:
        raise DatasetError(f"dataset registry not found: {where}") from None
    return _load_registry(where, mtime)


@cache
def _load_registry(where: Path, mtime_ns: int) -> dict[str, DatasetSpec]:
    try:
        raw = json.loads(where.read_text())
    except FileNotFoundError:
        raise DatasetError(f"dataset registry not found: {where}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(raw))
    if error is not None:
        raise DatasetError(f"{where}: {_json_path(error.absolute_path)}: {error.message}")
    _check_references(raw, where)
    real = {d["id"]: d for d in raw["datasets"] if d["kind"] == "real"}
    specs = {}
    for d in raw["datasets"]:
        twin = real.get(d.get("layout_of", ""), {})
        specs[d["id"]] = DatasetSpec(
            id=d["id"],
            study=d["study"],
            kind=d["kind"],
            description=d["description"],
            citation=d["citation"],
            licence=d["licence"],
            layout=d.get("layout") or twin["layout"],
            labels=d.get("labels") or twin["labels"],
            intensity=d["intensity"],
            split=d["split"],
            obtain=d.get("obtain", {}),
            generator=d.get("generator"),
            layout_of=d.get("layout_of"),
        )
    return specs


def list_datasets(study: str | None = None) -> list[str]:
    """Known dataset ids, optionally of one study."""
    return [k for k, spec in load_registry().items() if study is None or spec.study == study]


def get_dataset(dataset_id: str) -> DatasetSpec:
    """The resolved entry of ``dataset_id``; an unknown id lists the known ones."""
    registry = load_registry()
    if dataset_id not in registry:
        raise DatasetError(f"unknown dataset '{dataset_id}'; known: {', '.join(registry)}")
    return registry[dataset_id]
