"""MLflow calls of a study (a workflow invocation): its experiment, its parent run, its child runs.

Uses MLflow the way `moetuner.tracking` does (an `MlflowClient`, artifacts beside a sqlite store).
Every function raises on an MLflow failure; `moetuner.study` decides what a failure means.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from moetuner.tracking import RunLogger, experiment_id, git_commit


def client(tracking_uri: str) -> Any:
    """An MlflowClient for `tracking_uri` (file stores allowed, as in moetuner.tracking)."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    """Create the store (schema migrations) and the experiment (tagged EXPERIMENT_TAGS) if missing; return its id."""
    return experiment_id(client(tracking_uri), experiment, tracking_uri)


def create_parent_run(tracking_uri: str, experiment: str, name: str, tags: Mapping[str, str]) -> str:
    """Open a RUNNING run that outlives this process (ended by `end_run`); return its id."""
    exp_id = ensure_experiment(tracking_uri, experiment)
    all_tags = {"git_commit": git_commit(), **tags}
    run = client(tracking_uri).create_run(exp_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=name)
    return run.info.run_id


def run_logger(tracking_uri: str, run_id: str) -> RunLogger:
    """A RunLogger (metrics, tags, artifacts) for an existing run."""
    return RunLogger(run_id, client(tracking_uri))


def run_status(tracking_uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED, ..."""
    return client(tracking_uri).get_run(run_id).info.status


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark a run FINISHED or FAILED."""
    client(tracking_uri).set_terminated(run_id, status=status)


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    """All runs nested under `parent_run_id` (mlflow.entities.Run)."""
    mlflow_client = client(tracking_uri)
    exp_id = mlflow_client.get_run(parent_run_id).info.experiment_id
    return list(mlflow_client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                          max_results=5000))
