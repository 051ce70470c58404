"""Dataset registry API: ``datasets.json`` -> MONAI data dicts with deterministic splits."""

from medseg_monai.data.datalist import (
    FOLD_POOLS,
    SPLITS,
    decathlon_doc,
    default_dataset,
    evaluation_cases,
    find_cases,
    fold_cases,
    is_configured,
    load_datalist,
    load_splits,
    resolve_data_root,
    resolve_data_roots,
    select_split,
    split_cases,
    take,
    training_cases,
    validation_cases,
    write_datalist,
    write_json,
)
from medseg_monai.data.registry import DatasetError, DatasetSpec, get_dataset, list_datasets, load_registry

__all__ = [
    "FOLD_POOLS",
    "SPLITS",
    "decathlon_doc",
    "DatasetError",
    "DatasetSpec",
    "default_dataset",
    "evaluation_cases",
    "find_cases",
    "fold_cases",
    "is_configured",
    "get_dataset",
    "list_datasets",
    "load_datalist",
    "load_splits",
    "load_registry",
    "resolve_data_root",
    "resolve_data_roots",
    "select_split",
    "split_cases",
    "take",
    "training_cases",
    "validation_cases",
    "write_datalist",
    "write_json",
]
from medseg_monai.data.copies import AddedCopiesDataset, added_copies  # noqa: E402
from medseg_monai.deprecation import moved_names  # noqa: E402

__all__ += ["AddedCopiesDataset", "added_copies"]

# moved to medseg_monai.transforms (#38); the old path works one more release. Submodules load on
# first use, as the package's do: a config's `$import medseg_monai` reaches
# `medseg_monai.data.inputs.image_files` (an exported bundle imports nothing else)
__getattr__ = moved_names(__name__, {"OnCopiesd": "medseg_monai.transforms"}, load_submodules=True)
