"""Deprecated path (#38): the knee joint window is in :mod:`medseg_monai.transforms.spatial`. The
old names work one more release, with a DeprecationWarning naming the new path."""

from medseg_monai.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        name: "medseg_monai.transforms"
        for name in ("JointWindowCropd", "RecropToWindowd", "joint_centre", "reference_joint_centre")
    },
)
