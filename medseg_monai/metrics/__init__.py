"""Metrics of the studies that MONAI lacks, one module per family (re-exported here).

- :mod:`.lesions`: the WMH thesis's voxel and lesion-wise metrics and the lesion table writer.
"""

from medseg_monai.metrics.lesions import (
    BRACKETS,
    LesionMetrics,
    LesionTableWriter,
    VoxelMetrics,
    average_recall,
    bracket_labels,
    lesion_table,
    voxel_metrics,
)

__all__ = [
    "BRACKETS",
    "LesionMetrics",
    "LesionTableWriter",
    "VoxelMetrics",
    "average_recall",
    "bracket_labels",
    "lesion_table",
    "voxel_metrics",
]
