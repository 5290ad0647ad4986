"""Failures on Slurm as a cluster user expects them, on the one-machine cluster of
workflow/profiles/slurm/local-cluster.sh (slurmdbd, slurmctld, two slurmd): a job cancelled with scancel is
reported and rerun, with no half-written output; a study whose invocation dies while its Slurm jobs run
names them instead of unlocking, and recovers once they are gone; a tracking server that is down stops the
study before sbatch. Skipped where Slurm is not installed (CI installs it: .ci/run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from moetuner import PROJECT_ROOT, tracking
from moetuner.study.parent_run import PARENT_FILE
from test_workflow import snakemake_command, snakemake_env

CLUSTER = PROJECT_ROOT / "workflow" / "profiles" / "slurm" / "local-cluster.sh"
PROFILE = PROJECT_ROOT / "workflow" / "profiles" / "slurm"
TARGET = "results/tiny/traces/synth-a.safetensors"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("slurmdbd") is None,
                       reason="Slurm is not installed: bash workflow/profiles/slurm/local-cluster.sh install "
                              "(root, Debian; CI does it)"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    subprocess.run(["bash", str(CLUSTER), "start"], check=True, timeout=300)
    try:
        yield
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], check=False, timeout=300)


@pytest.fixture
def slow_study(tmp_path: Path) -> Path:
    """The tiny study with a synth-a large enough (10M tokens) that its job runs long enough to kill."""
    config = yaml.safe_load((PROJECT_ROOT / "conf" / "study" / "tiny.yaml").read_text())
    args = config["traces"]["synth-a"]["args"]
    config["traces"]["synth-a"]["args"] = [a if not a.startswith("num_tokens=") else "num_tokens=10000000" for a in args]
    path = tmp_path / "slow-tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_study(workdir: Path, config: Path, uri: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = snakemake_command(workdir, "--workflow-profile", str(PROFILE), "--jobs", "2", TARGET, study=str(config),
                            uri=uri)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**snakemake_env(), **(env or {})},
                            start_new_session=True)


def wait_for_running_job(workdir: Path, uri: str, log: Path, proc: subprocess.Popen) -> tuple[str, str]:
    """(Slurm job id, MLflow run id) of the synth job once its run is RUNNING."""
    record_path = workdir / "results" / "tiny" / PARENT_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        jobs = SUBMITTED.findall(log.read_text())
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if jobs and record.get("run_id"):
            running = [r for r in tracking.child_runs(uri, record["run_id"]) if r.info.status == "RUNNING"]
            if running:
                return jobs[0], running[0].info.run_id
    raise AssertionError(f"the synth job never ran with its MLflow run open: {log.read_text()[-3000:]}")


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True, text=True,
                         check=True).stdout
    return out.strip()


def rerun(workdir: Path, config: Path, uri: str, log: Path) -> str:
    proc = start_study(workdir, config, uri, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def test_scancelled_job_is_reported_and_rerun(cluster, tmp_path: Path, slow_study: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "first.log"
    proc = start_study(tmp_path, slow_study, uri, log)
    job, run_id = wait_for_running_job(tmp_path, uri, log, proc)
    subprocess.run(["scancel", job], check=True)
    assert proc.wait(timeout=300) != 0
    output = log.read_text()
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in output
    assert sacct_state(job).startswith("CANCELLED")
    traces = tmp_path / "results" / "tiny" / "traces"
    assert not list(traces.glob("synth-a*")), f"half-written output left: {list(traces.glob('synth-a*'))}"
    client = tracking.client(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    parent = json.loads((tmp_path / "results" / "tiny" / PARENT_FILE).read_text())["run_id"]
    assert client.get_run(parent).info.status == "FAILED"
    second = rerun(tmp_path, slow_study, uri, tmp_path / "second.log")
    (new_job,) = SUBMITTED.findall(second)
    assert new_job != job and sacct_state(new_job) == "COMPLETED"
    assert (traces / "synth-a.safetensors").is_file()


def test_dead_invocation_names_its_slurm_jobs_then_recovers(cluster, tmp_path: Path, slow_study: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "first.log"
    proc = start_study(tmp_path, slow_study, uri, log)
    job, run_id = wait_for_running_job(tmp_path, uri, log, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the invocation dies; its Slurm job runs on
    proc.wait()
    blocked = subprocess.run(snakemake_command(tmp_path, "--workflow-profile", str(PROFILE), TARGET,
                                               study=str(slow_study), uri=uri),
                             capture_output=True, text=True, timeout=300, env=snakemake_env())
    assert blocked.returncode != 0
    assert "is locked by a running study: " in blocked.stdout  # its job's processes on this host, and the job
    assert f"Slurm job {job}." in blocked.stdout and "scancel" in blocked.stdout
    subprocess.run(["scancel", job], check=True)
    deadline = time.monotonic() + 120
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"Slurm job {job} did not end after scancel"
        time.sleep(1)
    dead_parent = json.loads((tmp_path / "results" / "tiny" / PARENT_FILE).read_text())["run_id"]
    output = rerun(tmp_path, slow_study, uri, tmp_path / "second.log")
    assert "removed the stale Snakemake lock" in output
    client = tracking.client(uri)
    assert client.get_run(dead_parent).info.status == "KILLED"
    assert client.get_run(run_id).info.status == "KILLED"


def test_tracking_server_down_stops_before_sbatch(cluster, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = subprocess.run(["sacct", "-X", "-n", "-a", "-o", "JobID"], capture_output=True, text=True).stdout
    log = tmp_path / "study.log"
    proc = start_study(tmp_path, PROJECT_ROOT / "conf" / "study" / "tiny.yaml", None, log,
                       env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert proc.wait(timeout=300) != 0
    output = log.read_text()
    assert "MLFLOW_TRACKING_URI" in output and "does not answer" in output
    assert not SUBMITTED.search(output)
    assert subprocess.run(["sacct", "-X", "-n", "-a", "-o", "JobID"], capture_output=True, text=True).stdout == before
