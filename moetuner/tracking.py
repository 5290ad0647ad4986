"""The only module that talks to MLflow.

One run per app invocation (nested under `parent_run_id` when given): flattened config leaves as
params, the resolved config as an artifact, metrics, figures and output files as artifacts, and tags
(app, git commit, model, dataset). If MLflow fails, the app still writes its outputs and says so.
Every app's main is `tracked_app`: it checks its input, then hands the run's tags and its work
(`AppRun`) to the wrapper, which opens the run, logs what the work returns (`AppResult`) once and
returns the app's headline metric, the value a Hydra sweeper optimises.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moetuner import PROJECT_ROOT

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 500
RUN_TAGS_ENV = "MOETUNER_RUN_TAGS"
"""A JSON object of extra tags for the runs an app opens (a workflow sets it per job: rule, wildcards)."""
RUN_NAME_TAG = "mlflow.runName"
"""A tag in `$MOETUNER_RUN_TAGS` under this key names the run (default: the app's name)."""
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Tags of every experiment the project creates. MLflow 3 marks an experiment's kind with
`mlflow.experimentKind` (genai_development | custom_model_development | ...): this one is a classic ML
experiment (runs, metrics, artifacts), not a GenAI one (traces). The 3.17 UI picks its pages by its own
GenAI / Model training switch (`?workflowType=machine_learning`; docs/study.md)."""


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else `sqlite:///<project root>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def git_commit() -> str:
    """The project's current git commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_tags() -> dict[str, str]:
    """Tags from `$MOETUNER_RUN_TAGS` (a JSON object); malformed JSON is reported and ignored."""
    text = os.environ.get(RUN_TAGS_ENV)
    if not text:
        return {}
    try:
        tags = json.loads(text)
        assert isinstance(tags, dict)
    except (ValueError, AssertionError):
        log.warning("%s must be a JSON object of tags, got %r; ignored", RUN_TAGS_ENV, text)
        return {}
    return {str(k): str(v) for k, v in tags.items()}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into {'a.b.c': str(leaf)}; lists stay as one leaf."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


class RunLogger:
    """Logs to one MLflow run; every call is a no-op (with one warning) once MLflow has failed."""

    def __init__(self, run_id: str | None, client: Any | None) -> None:
        self.run_id = run_id
        self._client = client

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            return
        try:
            getattr(self._client, fn)(self.run_id, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - MLflow failures must never lose the app's outputs
            log.warning("MLflow: could not log %s (%s); outputs are written anyway, "
                        "further MLflow logging is off for this run", what, err)
            self._client = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-numeric values are skipped)."""
        if not self.active:  # no MLflow import (seconds) for a run that logs nothing
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 1000):
            self._call("metrics", "log_batch", metrics=items[i:i + 1000])

    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("params", "log_batch", params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._call(f"tag {k}", "set_tag", k, str(v))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file or a folder as artifact(s)."""
        path = Path(path)
        if path.is_dir():
            self._call(f"artifacts {path}", "log_artifacts", str(path), artifact_path)
        elif path.is_file():
            self._call(f"artifact {path}", "log_artifact", str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"artifact {artifact_file}", "log_text", text, artifact_file)


def _artifact_location(tracking_uri: str) -> str | None:
    """For a sqlite store, keep artifacts in `mlruns/` beside the database (not in the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


def experiment_id(client: Any, experiment: str, tracking_uri: str) -> str:
    """The id of `experiment`, created (with EXPERIMENT_TAGS, artifacts beside a sqlite store) if missing;
    an existing experiment without the EXPERIMENT_TAGS gets them."""
    import mlflow

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            return client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri),
                                            tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:  # created by a concurrent job meanwhile
            exp = client.get_experiment_by_name(experiment)
    for key, value in EXPERIMENT_TAGS.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _open_run(app: str, experiment: str, parent_run_id: str | None, tags: Mapping[str, str],
              tracking_uri: str) -> RunLogger:
    try:
        mlflow_client = client(tracking_uri)
        exp_id = experiment_id(mlflow_client, experiment, tracking_uri)
        all_tags = {"app": app, "git_commit": git_commit(), **tags}
        run_name = all_tags.pop(RUN_NAME_TAG, app)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow_client.create_run(exp_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=str(run_name))
        return RunLogger(run.info.run_id, mlflow_client)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: could not open a run at %s (%s); the app's outputs are written "
                    "anyway, but nothing is tracked", tracking_uri, err)
        return RunLogger(None, None)


@contextmanager
def tracked_run(app: str, cfg: DictConfig | Mapping[str, Any], tags: Mapping[str, str] | None = None
                ) -> Iterator[RunLogger]:
    """Open an MLflow run for one app invocation; log config params/artifact; close it at the end.

    `cfg.mlflow` (the `mlflow/` config group) gives `enabled`, `experiment`, `tracking_uri`,
    `parent_run_id`. `$MOETUNER_RUN_TAGS` adds tags. The run ends FINISHED, or FAILED if the block raises.
    """
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    settings = dict(container.get("mlflow") or {})
    if not settings.get("enabled", True):
        yield RunLogger(None, None)
        return
    uri = settings.get("tracking_uri") or default_tracking_uri()
    run = _open_run(app, settings.get("experiment") or "moetuner", settings.get("parent_run_id"),
                    {**env_tags(), **(tags or {})}, uri)
    run.log_params(flatten({k: v for k, v in container.items() if k not in ("mlflow", "hydra")}))
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
        run.log_artifact(resolved)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run._call("run status", "set_terminated", status=status)


Artifact = str | os.PathLike[str] | tuple[str | os.PathLike[str], str]
"""A file or folder to log as an artifact, alone or with the artifact folder to put it in."""


@dataclass(frozen=True)
class AppResult:
    """What one app invocation logs to its run, once its work is done."""

    metrics: Mapping[str, Any] = field(default_factory=dict)  # non-numeric values are skipped
    artifacts: Sequence[Artifact] = ()
    tags: Mapping[str, str] = field(default_factory=dict)  # known only after the work (e.g. a solve's status)
    series: Mapping[str, Sequence[float]] = field(default_factory=dict)  # metric -> its values at steps 0, 1, ...
    headline: str | None = None  # the key of `metrics` a Hydra sweeper optimises

    def headline_value(self) -> float | None:
        """metrics[headline] as a float (None without a headline or a numeric value)."""
        value = self.metrics.get(self.headline) if self.headline else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def log_result(run: RunLogger, result: AppResult) -> None:
    """Metrics, per-step series, tags, then artifacts of `result`, each logged once."""
    run.log_metrics(result.metrics)
    for name, values in result.series.items():
        for step, value in enumerate(values):
            run.log_metrics({name: value}, step=step)
    run.set_tags(result.tags)
    for artifact in result.artifacts:
        run.log_artifact(*artifact) if isinstance(artifact, tuple) else run.log_artifact(artifact)


@dataclass(frozen=True)
class AppRun:
    """An app invocation whose input is checked: the run's tags and the work, which returns what to log."""

    tags: Mapping[str, str]
    work: Callable[[], AppResult]


def tracked_app(app: str) -> Callable[[Callable[[DictConfig], AppRun]], Callable[[DictConfig], float | None]]:
    """Decorate an app's main (under `@hydra.main`): `prepare(cfg) -> AppRun` checks the input, so bad input
    fails before a run is opened; the run then opens (tracked_run: config as params and artifact), the work
    runs, its AppResult is logged once, and main returns the headline metric (for a Hydra sweeper)."""

    def wrap(prepare: Callable[[DictConfig], AppRun]) -> Callable[[DictConfig], float | None]:
        @functools.wraps(prepare)
        def main(cfg: DictConfig) -> float | None:
            job = prepare(cfg)
            with tracked_run(app, cfg, tags=job.tags) as run:
                result = job.work()
                log_result(run, result)
            return result.headline_value()

        return main

    return wrap


# A study (a workflow invocation): its experiment, its parent run, its child runs. These raise on an
# MLflow failure; moetuner.study decides what a failure means.

def client(tracking_uri: str) -> Any:
    """An MlflowClient for `tracking_uri` (file stores allowed)."""
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


def end_running_children(tracking_uri: str, parent_run_id: str, status: str = "KILLED") -> list[Any]:
    """End every RUNNING run nested under `parent_run_id` with `status`; return those runs."""
    running = [run for run in child_runs(tracking_uri, parent_run_id) if run.info.status == "RUNNING"]
    mlflow_client = client(tracking_uri)
    for run in running:
        mlflow_client.set_terminated(run.info.run_id, status=status)
    return running
