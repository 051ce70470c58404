"""Transforms MONAI lacks, by family as MONAI's ``monai/transforms/<family>/``; every public name is
re-exported here, so configs name them ``medseg_monai.transforms.<Name>``:

- :mod:`.io`: checks of the files before and after loading, per-structure mask loading, the volume
  bundles' loading steps (:func:`load_volumes`), the JSRT palette converter, and saving predictions
  as label PNGs and overlay figures.
- :mod:`.intensity`: background to zero, scaling by bit depth, fixed noisy cases, a simulated
  narrow grey range, N4 bias-field correction.
- :mod:`.spatial`: resizing to a reference, the WMH in-plane grid, the knee joint window.
- :mod:`.labels`: file values to classes, masks to labels, labels to regions, outputs to classes.
- :mod:`.slices`: 2.5D neighbour-slice stacks and entropy filtering of slices.
- :mod:`.utility`: a transform applied to added copies only.

The 2.5D data set and inferer are not transforms: :class:`medseg_monai.data.slices.SliceDataset`,
:class:`medseg_monai.inferers.NeighbourSliceInferer`.
"""

from medseg_monai.transforms.intensity import (
    BackgroundToZerod,
    CaseGaussianNoised,
    N4BiasFieldCorrectiond,
    RandStoredRanged,
    ScaleByBitDepthd,
    n4_bias_field,
)
from medseg_monai.transforms.io import (
    CheckFilesd,
    CheckGeometryd,
    CheckIntensityd,
    LoadMasksd,
    SaveDicomSegd,
    SaveLabelPNGd,
    SaveVolumeOverlayd,
    apply_palette,
    load_volumes,
)
from medseg_monai.transforms.labels import (
    Argmaxd,
    LabelToRegionsd,
    MapsToLabeld,
    MasksToLabeld,
    RemapLabelsd,
    SplitByNearestLabeld,
    class_indices,
)
from medseg_monai.transforms.slices import (
    EntropySliceFilterd,
    ExtractSlicesd,
    neighbour_indices,
    slice_entropy,
    spatial_axis,
    stack_neighbours,
)
from medseg_monai.transforms.spatial import (
    InPlaneGridd,
    JointWindowCropd,
    RecropToWindowd,
    ResizeToMatchd,
    SpatialPadSliceMinimumd,
    joint_centre,
    reference_joint_centre,
)
from medseg_monai.transforms.utility import OnCopiesd

__all__ = [
    "Argmaxd",
    "BackgroundToZerod",
    "CaseGaussianNoised",
    "CheckFilesd",
    "CheckGeometryd",
    "CheckIntensityd",
    "EntropySliceFilterd",
    "ExtractSlicesd",
    "InPlaneGridd",
    "JointWindowCropd",
    "LabelToRegionsd",
    "LoadMasksd",
    "MapsToLabeld",
    "MasksToLabeld",
    "N4BiasFieldCorrectiond",
    "OnCopiesd",
    "RandStoredRanged",
    "RecropToWindowd",
    "RemapLabelsd",
    "ResizeToMatchd",
    "SaveDicomSegd",
    "SaveLabelPNGd",
    "SaveVolumeOverlayd",
    "ScaleByBitDepthd",
    "SpatialPadSliceMinimumd",
    "SplitByNearestLabeld",
    "apply_palette",
    "class_indices",
    "joint_centre",
    "load_volumes",
    "n4_bias_field",
    "neighbour_indices",
    "reference_joint_centre",
    "slice_entropy",
    "spatial_axis",
    "stack_neighbours",
]
