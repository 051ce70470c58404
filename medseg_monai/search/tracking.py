"""What a search leaves in MLflow: one parent run in the study's experiment, every trial's training
run its child (named and tagged ``search.*``, with the metric ``search.score``), the parent's
``score`` and ``best_score`` per trial, and at the end the trajectory figure and ``trials.csv``."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from medseg_monai.search.figure import plot_trajectory, trial_points
from medseg_monai.search.storage import count_trials, locked
from medseg_monai.tracking import (
    RUN_RECORD,
    ensure_experiment,
    flatten_params,
    open_client,
    recorded_run,
    tracking_uri,
)

if TYPE_CHECKING:
    from medseg_monai.search.trial import SearchSetup

__all__ = ["ParentMetrics", "finish_parent_run", "parent_run", "tag_abandoned", "tag_trial_run"]


def tag_abandoned(
    study: optuna.Study, number: int, trial_dir: Path, params: Mapping[str, Any], why: str
) -> None:
    """Best effort: name and tag the MLflow run of a trial that did not finish (when its training
    opened one) as the search's trial, with why it ended; its parameters are queued again."""
    if not (trial_dir / RUN_RECORD).is_file():
        return
    try:
        run_id = recorded_run(trial_dir)
        if run_id is None:
            return
        client = open_client()
        tags = {
            "mlflow.runName": f"search {study.study_name} trial {number}",
            "search.name": study.study_name,
            "search.role": "trial",
            "search.trial": str(number),
            "search.params": json.dumps(dict(params)),
            "search.error": f"{why}: its parameters were queued again",
        }
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    except Exception as e:  # the search goes on without the tags
        print(f"warning: could not tag the MLflow run of trial {number}: {e}", file=sys.stderr)


def tag_trial_run(
    client: Any,
    setup: SearchSetup,
    parent_run_id: str | None,
    trial: optuna.Trial,
    params: dict[str, Any],
    run_id: str | None,
    score: float | None,
    error: str | None,
) -> None:
    """Name and tag the trial's run as the parent's child (one is created, FAILED, when the
    training failed before it opened its run), with the score as metric ``search.score``."""
    from mlflow.entities import Param  # lazy: MLflow's import takes seconds

    tags = {
        "mlflow.runName": f"search {setup.name} trial {trial.number}",
        "search.name": setup.name,
        "search.role": "trial",
        "search.trial": str(trial.number),
        "search.params": json.dumps(params),
        "search.steps": str(trial.user_attrs.get("steps", setup.steps)),
        "profile": setup.profile,
    }
    if error:
        tags["search.error"] = error[:4000]
    if run_id is None:  # the training failed before opening its run: a FAILED run stands for it
        exp_id = ensure_experiment(setup.experiment_name, client)
        parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        run_id = client.create_run(exp_id, tags={**tags, **parent}).info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        client.set_terminated(run_id, status="FAILED")
    else:  # the training's own run, the parent's child already (MLflowTracker reads the env)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    if score is not None:
        client.log_metric(run_id, "search.score", score, step=trial.number)
    trial.set_user_attr("mlflow_run_id", run_id)


class ParentMetrics:
    """After each completed trial: the parent run's ``score`` (step: the trial's number) and
    ``best_score`` (step: the number of completed trials, so that it never worsens when parallel
    trials finish out of order)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = open_client()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.client.log_metric(self.run_id, "score", float(trial.value), step=trial.number)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        self.client.log_metric(self.run_id, "best_score", float(study.best_value), step=done)


def parent_run(setup: SearchSetup, study: optuna.Study) -> str:
    """The search's MLflow parent run (recorded in the study), created on first use; set RUNNING."""
    from mlflow.entities import Param  # lazy: MLflow's import takes seconds
    from mlflow.exceptions import MlflowException

    from medseg_monai.record import git_state  # lazy: record imports MONAI and MLflow

    client = open_client()
    with locked(setup.folder / "search.lock"):
        attrs = study.user_attrs
        run_id = (
            attrs.get("mlflow_parent_run_id") if attrs.get("mlflow_tracking_uri") == tracking_uri() else None
        )
        if run_id is not None:
            try:
                if client.get_run(run_id).info.lifecycle_stage == "active":
                    client.update_run(run_id, status="RUNNING")
                    client.set_tag(run_id, "search.trials", str(setup.n_trials))  # --trials may grow
                    return run_id
            except MlflowException:
                pass
        exp_id = ensure_experiment(setup.experiment_name, client)
        suffix = "" if setup.profile == "paper" else f" ({setup.profile})"
        tags = {
            "mlflow.runName": f"search {setup.name}{suffix}",
            "search.name": setup.name,
            "search.role": "parent",
            "search.metric": setup.metric,
            "search.direction": setup.direction,
            "search.steps": str(setup.steps),
            "search.trials": str(setup.n_trials),
            "search.folder": str(setup.folder),
            "study": setup.study,
            "profile": setup.profile,
            **git_state(),
        }
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        params = flatten_params(
            {
                "metric": setup.metric,
                "direction": setup.direction,
                "steps": setup.steps,
                "factor": setup.spec.factor,
                "seed": setup.spec.seed,
                "experiment": setup.bundle_experiment or "",
                "start": {p.name: p.start for p in setup.parameters},
                "min": {p.name: p.low for p in setup.parameters},
                "max": {p.name: p.high for p in setup.parameters},
                "overrides": setup.overrides,
            }
        )
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        study.set_user_attr("mlflow_parent_run_id", run_id)
        study.set_user_attr("mlflow_tracking_uri", tracking_uri())
        return run_id


def finish_parent_run(setup: SearchSetup, study: optuna.Study, parent: str, status: int) -> None:
    """Write ``trials.csv`` and ``trajectory.png`` to the search folder, log them and the best trial
    into the parent run, and end it: FINISHED with ``n_trials`` complete and none running."""
    client = open_client()
    study.trials_dataframe().to_csv(setup.folder / "trials.csv", index=False)
    title = f"{setup.study} search '{setup.name}' ({setup.profile}): {setup.steps} steps a trial"
    png = plot_trajectory(trial_points(study), setup.metric, setup.direction, title)
    (setup.folder / "trajectory.png").write_bytes(png)
    for name in ("trajectory.png", "trials.csv"):
        client.log_artifact(parent, str(setup.folder / name))
    complete = count_trials(study, TrialState.COMPLETE)
    client.set_tag(parent, "search.completed", str(complete))
    if complete:
        best = study.best_trial
        client.set_tag(parent, "search.best_trial", str(best.number))
        client.set_tag(parent, "search.best_params", json.dumps(best.params))
        client.log_metric(parent, "best", float(best.value))
    running = count_trials(study, TrialState.RUNNING)
    end = "FINISHED" if complete >= setup.n_trials and not running else "KILLED" if status == 130 else None
    end = end or ("FAILED" if status else None)
    if end:
        client.set_terminated(parent, status=end)
