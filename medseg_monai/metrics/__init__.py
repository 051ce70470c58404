"""Metrics of the studies that MONAI lacks, one module per family (re-exported here).

- :mod:`.lesions`: the WMH thesis's voxel and lesion-wise metrics and the lesion table writer.
- :mod:`.minibatch`: the thesis's aggregation, the mean over 12-slice mini-batches.
"""

from medseg_monai.metrics import lesions, minibatch
from medseg_monai.metrics.lesions import *  # noqa: F403
from medseg_monai.metrics.minibatch import *  # noqa: F403

__all__ = [*lesions.__all__, *minibatch.__all__]
