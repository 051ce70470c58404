"""Metrics of the studies that MONAI lacks, one module per family (re-exported here).

- :mod:`.lesions`: the WMH thesis's voxel and lesion-wise metrics and the lesion table writer.
"""

from medseg_monai.metrics import lesions
from medseg_monai.metrics.lesions import *  # noqa: F403

__all__ = list(lesions.__all__)
