"""Hyperparameter search of a bundle: the LV paper's procedure, run on Optuna.

The procedure (Avetisian's method card): start from the current best settings; draw each searched
value in [0.1 p, 10 p] around the best value p so far; train a fixed number of optimiser steps (5000
in the paper); keep the candidate when its validation score is better. The card does not name the
distribution: we draw log-uniformly (uniform in log p), so that ten times less and ten times more
are equally likely; a uniform draw would land above p nine times in ten. Here:

- the rule is an Optuna sampler, :class:`BestNeighbourhoodSampler`: the first trial takes the start
  values, every later one draws each parameter log-uniformly in [b / factor, factor * b] (the
  interval clipped to the parameter's bounds) around its value b in the best completed trial;
  "keep the candidate if better" is then Optuna's ``best_trial``. Draws are seeded by
  (seed, trial number, parameter), so the same history gives the same draws;
- a trial is one training of the bundle through the launcher, in a subprocess, with the trial's
  values as overrides and ``max_epochs`` = ceil(steps / training batches per epoch) (whole epochs:
  at least ``steps`` steps), into ``runs/<study>/<profile>/search/<name>/trial<k>`` (its log:
  ``train.log`` there). Its score is the best value of ``metric`` in the training's MLflow run
  (every validation's: ``<metric>`` per epoch and ``<metric>_by_iteration`` when logged);
- the bundle declares what is searched in ``bundles/<study>/configs/search.yaml``::

      metric: val_dice          # default: the bundle's key metric; higher is better unless
      direction: maximize       #   direction: minimize (default: from key_metric_mode)
      steps: {paper: 5000, quick: 40}   # optimiser steps per trial (or one number)
      trials: {paper: 20, quick: 3}     # optional default of --trials
      factor: 10                # optional: draws in [b / factor, factor b]
      seed: 0                   # optional: the sampler's seed
      parameters:               # top-level keys of train.yaml; the first trial starts here
        learning_rate: null     #   null: the value the bundle is configured with (profile included)
        dropout: {start: 0.15, max: 0.9}  # start, min, max (default start / 1e6 .. start * 1e6), type: int

- Optuna's journal (``optuna.log`` in the search folder, safe for several processes on one
  machine; ``--storage`` takes another) holds the trials: running the same command again resumes.
  Completed trials are kept; a trial left RUNNING by a worker that is gone (killed) is marked FAIL
  and its parameters queued again, so the next free worker trains them; ``--trials N`` means N
  completed trials in all. Ctrl-C (or SIGTERM) stops the trainings cleanly and queues the running
  trials' parameters again. ``--workers K`` runs K worker processes on the same journal (so may
  several commands on one machine): a lock in the search folder makes each take a different trial
  and stop at N;
- MLflow: one parent run ``search <name>`` in the study's experiment; every trial's training run is
  its child (tag ``mlflow.parentRunId``, set through ``MEDSEG_MLFLOW_PARENT_RUN_ID``, which the
  tracker reads) with the trial's values among its params, metric ``search.score`` and tags
  ``search.*``. The parent logs ``score`` and ``best_score`` per trial and, at the end, the
  trajectory figure (``trajectory.png``, also in the search folder) and ``trials.csv``.

    python -m medseg_monai.search --study S [--trials N] [--workers K] [--steps S]
        [--profile quick|paper] [--name NAME] [--experiment E] [--storage URL] [--key value ...]

The modules, by section: :mod:`~medseg_monai.search.spec` (``search.yaml``),
:mod:`~medseg_monai.search.sampler` (the paper's rule), :mod:`~medseg_monai.search.storage` (the
journal and its locks), :mod:`~medseg_monai.search.worker` (the trial loop and recovery),
:mod:`~medseg_monai.search.trial` (one bundle training), :mod:`~medseg_monai.search.tracking` (the
MLflow runs), :mod:`~medseg_monai.search.figure` (the trajectory) and
:mod:`~medseg_monai.search.cli` (the command).
"""

from medseg_monai.search.cli import main, search
from medseg_monai.search.figure import plot_trajectory, trial_points
from medseg_monai.search.sampler import BestNeighbourhoodSampler
from medseg_monai.search.spec import Parameter, SearchSpec, load_spec
from medseg_monai.search.storage import open_study
from medseg_monai.search.trial import BundleTrial, batches_per_epoch
from medseg_monai.search.worker import TrialFailed, TrialInterrupted, run_worker

__all__ = [
    "BestNeighbourhoodSampler",
    "BundleTrial",
    "Parameter",
    "SearchSpec",
    "TrialFailed",
    "TrialInterrupted",
    "batches_per_epoch",
    "load_spec",
    "main",
    "open_study",
    "plot_trajectory",
    "run_worker",
    "search",
    "trial_points",
]
