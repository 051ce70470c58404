"""Dataset registry API: ``datasets.json`` -> MONAI data dicts with deterministic splits."""

from medseg_monai.data.datalist import (
    SPLITS,
    default_dataset,
    find_cases,
    load_datalist,
    load_splits,
    resolve_data_root,
    split_cases,
    take,
    write_datalist,
)
from medseg_monai.data.registry import DatasetError, DatasetSpec, get_dataset, list_datasets, load_registry

__all__ = [
    "SPLITS",
    "DatasetError",
    "DatasetSpec",
    "default_dataset",
    "find_cases",
    "get_dataset",
    "list_datasets",
    "load_datalist",
    "load_splits",
    "load_registry",
    "resolve_data_root",
    "split_cases",
    "take",
    "write_datalist",
]
