"""One study job: an app command run as a child of the study's parent run (`python -m moetuner.study job`).

The prefix of every app rule: it appends the `mlflow.parent_run_id/tracking_uri/experiment` overrides and
puts the child run's tags (rule, wildcards, config hash; the app itself tags the git commit) in
`$MOETUNER_RUN_TAGS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moetuner.study.parent_run import read_parent
from moetuner.tracking import RUN_NAME_TAG, RUN_TAGS_ENV

MLFLOW_KEYS = ("mlflow.tracking_uri", "mlflow.experiment", "mlflow.parent_run_id")


def format_wildcards(wildcards: Mapping[str, Any]) -> str:
    """A job's wildcards as 'k=v,k=v' (read back by `parse_wildcards`)."""
    return ",".join(f"{k}={v}" for k, v in wildcards.items())


def parse_wildcards(text: str) -> dict[str, str]:
    """'k=v,k=v' -> {k: v}."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def job_prefix(results: str, rule: str, wildcards: Mapping[str, Any]) -> str:
    """The shell prefix a rule puts before its app command: `python -m moetuner.study job ... --`."""
    return (f"python -m moetuner.study job --results {shlex.quote(results)} --rule {rule} "
            f"--wildcards '{format_wildcards(wildcards)}' --")


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
