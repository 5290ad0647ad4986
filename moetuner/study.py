"""The MLflow side of a study run by Snakemake: one parent run per workflow invocation, one child per job.

- `start_parent` (the Snakefile's `onstart`, never on a dry run) creates the store, the experiment and
  a RUNNING parent run before any job starts, and writes its id to `<results>/mlflow_parent.json`.
- `run_job` (`python -m moetuner.study job ...`, the prefix of every app rule) runs one app with
  `mlflow.parent_run_id/tracking_uri/experiment` overrides appended and its child run's tags (rule,
  wildcards, config hash; the app itself tags the git commit) in `$MOETUNER_RUN_TAGS`.
- `finish_parent` (the report rule, `onsuccess`, `onerror`) logs the report, the headline numbers and the
  headline (as the run's description) on the parent and ends it.
MLflow failures are logged and never fail a job: outputs matter more than tracking.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moetuner import tracking_study
from moetuner.atomic import write_json_atomic
from moetuner.tracking import RUN_NAME_TAG, RUN_TAGS_ENV, default_tracking_uri

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
MLFLOW_KEYS = ("mlflow.tracking_uri", "mlflow.experiment", "mlflow.parent_run_id")
NOTE_TAG = "mlflow.note.content"  # the run's description (Markdown) in the MLflow UI
MAX_NOTE_CHARS = 7000  # MLflow tag values hold at most 8000 characters


def config_hash(overrides: Sequence[str]) -> str:
    """12 hex digits naming a job's configuration: its app and overrides, order-free, minus out/mlflow."""
    kept = sorted(o for o in overrides if not o.startswith(("out=", "mlflow.")))
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:12]


def run_name(rule: str, wildcards: Mapping[str, str]) -> str:
    """A child run's name: 'rule:v1/v2/...' with the wildcard values in order, a `replicas` value joined to
    the value before it as '-r<R>' (the study's file layout), e.g. 'solve:intent/h200_2x8/steptail-r1'."""
    parts: list[str] = []
    for key, value in wildcards.items():
        if key == "replicas" and parts:
            parts[-1] += f"-r{value}"
        else:
            parts.append(str(value))
    return f"{rule}:{'/'.join(parts)}" if parts else rule


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
        record["run_id"] = tracking_study.create_parent_run(uri, experiment, f"study:{study}",
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
        run = tracking_study.run_logger(uri, run_id)
        for path in artifacts:
            run.log_artifact(path)
        run.log_metrics(metrics or {})
        if note:
            run.set_tags({NOTE_TAG: note[:MAX_NOTE_CHARS]})
        if tracking_study.run_status(uri, run_id) == "RUNNING":
            tracking_study.end_run(uri, run_id, status)
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: could not finish parent run %s (%s)", run_id, err)


def browse_hint(results: str | Path, port: int = 5000) -> str | None:
    """How to open the study's parent run in the MLflow UI, or None without one. `workflowType=machine_learning`
    makes the MLflow 3.17 UI show the runs pages (its GenAI/Model training switch, which it remembers)."""
    record = read_parent(results)
    if not record or not record["run_id"]:
        return None
    try:
        exp_id = tracking_study.client(record["tracking_uri"]).get_run(record["run_id"]).info.experiment_id
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: cannot read parent run %s (%s)", record["run_id"], err)
        return None
    return (f"MLflow: mlflow ui --port {port} --backend-store-uri {record['tracking_uri']}, then open "
            f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{record['run_id']}?workflowType=machine_learning")


def mlflow_overrides(record: Mapping[str, Any]) -> list[str]:
    """Hydra overrides that nest an app's run under the parent (none without a parent)."""
    if not record.get("run_id"):
        return []
    values = (record["tracking_uri"], record["experiment"], record["run_id"])
    return [f"{key}='{value}'" for key, value in zip(MLFLOW_KEYS, values)]


def out_override(command: Sequence[str]) -> str | None:
    """The value of the `out=` override in an app command line."""
    return next((arg.removeprefix("out=") for arg in command if arg.startswith("out=")), None)



def run_job(results: str | Path, rule: str, wildcards: Mapping[str, str], command: Sequence[str]) -> int:
    """Run one app command nested under the study's parent run; return its exit status.

    Its child run is named `run_name(rule, wildcards)` and tagged with the rule, the wildcards and the
    config hash via `$MOETUNER_RUN_TAGS`.
    """
    record = read_parent(results) or {}
    assert out_override(command) is not None, f"the app command {list(command)} has no out= override"
    tags = {RUN_NAME_TAG: run_name(rule, wildcards), "rule": rule, "config_hash": config_hash(command),
            **{f"wildcard.{k}": v for k, v in wildcards.items()}}
    env = {**os.environ, RUN_TAGS_ENV: json.dumps(tags)}
    return subprocess.run([*command, *mlflow_overrides(record)], check=False, env=env).returncode


def _parse_wildcards(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m moetuner.study job|finish ...` (the Snakemake rules' helpers)."""
    parser = argparse.ArgumentParser(prog="python -m moetuner.study")
    sub = parser.add_subparsers(dest="cmd", required=True)
    job = sub.add_parser("job", help="run an app command as a child of the study's parent run")
    job.add_argument("--results", required=True)
    job.add_argument("--rule", required=True)
    job.add_argument("--wildcards", default="", help="k=v,k=v")
    job.add_argument("command", nargs=argparse.REMAINDER, help="-- app arguments...")
    fin = sub.add_parser("finish", help="log the report on the parent run and end it")
    fin.add_argument("--results", required=True)
    fin.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED"])
    fin.add_argument("--metrics", help="a JSON file of scalar metrics to log on the parent")
    fin.add_argument("--note", help="a Markdown file shown as the parent run's description")
    fin.add_argument("artifacts", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.cmd == "job":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        assert command, "give the app command after --"
        return run_job(args.results, args.rule, _parse_wildcards(args.wildcards), command)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    note = Path(args.note).read_text() if args.note else None
    finish_parent(args.results, args.status, args.artifacts, metrics, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
