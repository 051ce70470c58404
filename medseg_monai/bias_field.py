"""Deprecated path (#38): N4 bias-field correction is in :mod:`medseg_monai.transforms.intensity`.
The old names work one more release, with a DeprecationWarning naming the new path."""

from medseg_monai.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {"N4BiasFieldCorrectiond": "medseg_monai.transforms", "n4_bias_field": "medseg_monai.transforms"},
)
