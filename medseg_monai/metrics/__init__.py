"""Metrics of the studies that MONAI lacks, one module per family (re-exported here).

- :mod:`.cardiac`: surface distance with missed structures scored, ejection fractions (ACDC).
- :mod:`.lesions`: the WMH thesis's voxel and lesion-wise metrics and the lesion table writer.
- :mod:`.minibatch`: the thesis's aggregation, the mean over 12-slice mini-batches.
"""

from medseg_monai.metrics import cardiac, lesions, minibatch
from medseg_monai.metrics.cardiac import *  # noqa: F403
from medseg_monai.metrics.lesions import *  # noqa: F403
from medseg_monai.metrics.minibatch import *  # noqa: F403

__all__ = [*cardiac.__all__, *lesions.__all__, *minibatch.__all__]
