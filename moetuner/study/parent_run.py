"""The study's MLflow parent run: one per workflow invocation, recorded in `<results>/mlflow_parent.json`.

- `start_parent` (the Snakefile's `onstart`, never on a dry run) creates the store, the experiment and a
  RUNNING parent run before any job starts;
- `finish_parent` (the report rule, `onsuccess`, `onerror`) logs the report, the headline numbers and the
  headline (as the run's description) on the parent and ends it.
MLflow failures are logged and never fail a job: outputs matter more than tracking.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moetuner import tracking
from moetuner.atomic import write_json_atomic
from moetuner.tracking import default_tracking_uri

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
NOTE_TAG = "mlflow.note.content"  # the run's description (Markdown) in the MLflow UI
MAX_NOTE_CHARS = 7000  # MLflow tag values hold at most 8000 characters


def parent_path(results: str | Path) -> Path:
    return Path(results) / PARENT_FILE


def read_parent(results: str | Path) -> dict[str, Any] | None:
    """The parent-run record of the current invocation ({run_id, tracking_uri, experiment}), or None."""
    path = parent_path(results)
    return json.loads(path.read_text()) if path.is_file() else None


def start_parent(results: str | Path, study: str, experiment: str, tracking_uri: str | None = None,
                 tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Create the experiment and a RUNNING parent run; record it in `<results>/mlflow_parent.json`."""
    uri = tracking_uri or default_tracking_uri()
    record: dict[str, Any] = {"run_id": None, "tracking_uri": uri, "experiment": experiment}
    try:
        record["run_id"] = tracking.create_parent_run(uri, experiment, f"study:{study}",
                                                           {"study": study, **(tags or {})})
    except Exception as err:  # noqa: BLE001 - the study runs without tracking rather than not at all
        log.warning("MLflow: no parent run at %s (%s); jobs run untracked by the study", uri, err)
    write_json_atomic(parent_path(results), record)
    return record


def finish_parent(results: str | Path, status: str, artifacts: Sequence[str | Path] = (),
                  metrics: Mapping[str, float] | None = None, note: str | None = None) -> None:
    """Log `artifacts`/`metrics` (and `note`, Markdown shown as the run's description in the MLflow UI) on the
    parent run and end it with `status` if it is still RUNNING."""
    assert status in ("FINISHED", "FAILED"), status
    record = read_parent(results)
    if not record or not record["run_id"]:
        return
    uri, run_id = record["tracking_uri"], record["run_id"]
    try:
        run = tracking.run_logger(uri, run_id)
        for path in artifacts:
            run.log_artifact(path)
        run.log_metrics(metrics or {})
        if note:
            run.set_tags({NOTE_TAG: note[:MAX_NOTE_CHARS]})
        if tracking.run_status(uri, run_id) == "RUNNING":
            tracking.end_run(uri, run_id, status)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: could not finish parent run %s (%s)", run_id, err)


def browse_hint(results: str | Path, port: int = 5000) -> str | None:
    """How to open the study's parent run in the MLflow UI, or None without one. `workflowType=machine_learning`
    makes the MLflow 3.17 UI show the runs pages (its GenAI/Model training switch, which it remembers)."""
    record = read_parent(results)
    if not record or not record["run_id"]:
        return None
    try:
        exp_id = tracking.client(record["tracking_uri"]).get_run(record["run_id"]).info.experiment_id
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: cannot read parent run %s (%s)", record["run_id"], err)
        return None
    return (f"MLflow: mlflow ui --port {port} --backend-store-uri {record['tracking_uri']}, then open "
            f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{record['run_id']}?workflowType=machine_learning")
