"""Ignite handlers the bundles attach (in ``train#handlers`` / ``validate#handlers`` and the studies'
``train_handlers`` / ``val_handlers``), one module per concern:

- :mod:`.training`: :class:`EarlyStopping`, :class:`GradientClipping`, :class:`SchedulerStepper`, :class:`StopOnNonFiniteLoss`,
  :class:`ValidationSchedule`.
- :mod:`.case_metrics`: :class:`CaseMetrics`, the ``metrics.json`` contract.
- :mod:`.tracking`: :class:`MLflowTracker`, one tagged MLflow run per training (or evaluation).
- :mod:`.resume`: :class:`TrainingCheckpoint`, resumable and interruptible trainings.
- :mod:`.evaluation`: :class:`EvaluationResults`, an evaluation's results all or nothing.
- :mod:`.progress`: :class:`ProgressLog`, the run's expected length and one line per epoch.

:class:`~medseg_monai.metrics.LesionTableWriter` lives with the lesion metrics it writes; it is
re-exported here so configs naming ``medseg_monai.handlers.LesionTableWriter`` keep working.
"""

from medseg_monai.handlers.case_metrics import CaseMetrics, summarise_cases
from medseg_monai.handlers.evaluation import EvaluationResults
from medseg_monai.handlers.progress import ProgressLog
from medseg_monai.handlers.resume import TrainingCheckpoint
from medseg_monai.handlers.tracking import MLflowTracker, config_params
from medseg_monai.handlers.training import (
    EarlyStopping,
    GradientClipping,
    SchedulerStepper,
    StopOnNonFiniteLoss,
    ValidationSchedule,
)
from medseg_monai.metrics.lesions import LesionTableWriter

__all__ = [
    "CaseMetrics",
    "EarlyStopping",
    "EvaluationResults",
    "GradientClipping",
    "LesionTableWriter",
    "MLflowTracker",
    "ProgressLog",
    "SchedulerStepper",
    "StopOnNonFiniteLoss",
    "TrainingCheckpoint",
    "ValidationSchedule",
    "config_params",
    "summarise_cases",
]
