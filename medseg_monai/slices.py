"""Deprecated path (#38): the 2.5D transforms are in :mod:`medseg_monai.transforms.slices`, the
slice data set in :mod:`medseg_monai.data.slices`, the inferer in :mod:`medseg_monai.inferers`.
The old names work one more release, with a DeprecationWarning naming the new path."""

from medseg_monai.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "EntropySliceFilterd": "medseg_monai.transforms",
        "ExtractSlicesd": "medseg_monai.transforms",
        "NeighbourSliceInferer": "medseg_monai.inferers",
        "SliceDataset": "medseg_monai.data.slices",
        "neighbour_indices": "medseg_monai.transforms",
        "slice_entropy": "medseg_monai.transforms",
        "stack_neighbours": "medseg_monai.transforms",
    },
)
