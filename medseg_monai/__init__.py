"""medseg-monai: shared extensions for the suite's MONAI bundles."""

__version__ = "0.1.0"
