"""A crashed study recovers on its next invocation; a tracking server that is down stops a study before any job.

The lock and the MLflow runs of a study killed with SIGKILL (moetuner/study/recovery.py), on the local executor; the
same on Slurm is in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetuner import tracking
from moetuner.study import recovery
from moetuner.study.parent_run import PARENT_FILE
from test_workflow import snakemake, snakemake_command, snakemake_env


def lock(workdir: Path) -> Path:
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    path = locks / "0.input.lock"
    path.write_text("results/x\n")
    return path


def test_stale_lock_is_released_only_when_no_study_runs_here(tmp_path: Path, capsys) -> None:
    path = lock(tmp_path)
    fake = tmp_path / "snakemake"  # a process whose command names snakemake, working in this folder
    fake.write_text("import time\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(fake)], cwd=tmp_path)
    try:
        time.sleep(0.5)
        assert not recovery.release_stale_lock(tmp_path)
        assert path.exists()
        assert f"locked by a running study: {proc.pid}: " in capsys.readouterr().out
    finally:
        proc.kill()
        proc.wait()
    assert recovery.release_stale_lock(tmp_path)
    assert not path.exists()
    assert "removed the stale Snakemake lock" in capsys.readouterr().out
    assert not recovery.release_stale_lock(tmp_path)  # nothing locked: nothing to do


def test_lock_taken_on_another_host_names_the_unlock_command(tmp_path: Path, capsys) -> None:
    path = lock(tmp_path)
    (tmp_path / recovery.INVOCATION_FILE).write_text(json.dumps({"host": "login-2", "pid": 4242}))
    assert not recovery.release_stale_lock(tmp_path)
    assert path.exists()
    out = capsys.readouterr().out
    assert "started on host login-2 (pid 4242)" in out and "--unlock" in out


def test_tracking_server_down_stops_the_study_before_any_job(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    done = subprocess.run(snakemake_command(tmp_path), capture_output=True, text=True, timeout=300,
                          env={**snakemake_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert done.returncode != 0
    assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in done.stderr
    assert "MLFLOW_TRACKING_URI" in done.stderr and "No job was submitted" in done.stderr
    assert not (tmp_path / "results" / "tiny" / "traces").exists()  # no job ran
    assert not list((tmp_path / ".snakemake" / "locks").glob("*"))  # and the lock was released


def test_runs_of_killed_jobs_end_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.create_parent_run(uri, "test-orphans", "study:x", {})
    (tmp_path / PARENT_FILE).write_text(json.dumps({"run_id": parent, "tracking_uri": uri, "experiment": "x"}))
    client = tracking.client(uri)
    exp = client.get_run(parent).info.experiment_id
    killed = client.create_run(exp, tags={"mlflow.parentRunId": parent}, run_name="solve:a").info.run_id
    done = client.create_run(exp, tags={"mlflow.parentRunId": parent}, run_name="split:a").info.run_id
    client.set_terminated(done, "FINISHED")
    assert recovery.end_orphan_children(tmp_path) == 1
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"
    assert client.get_run(parent).info.status == "RUNNING"  # the invocation's own end decides its parent


@pytest.mark.slow
def test_study_killed_with_sigkill_recovers_on_the_next_invocation(tmp_path: Path) -> None:
    """The new user's case: the study is SIGKILLed (with its jobs) while a job runs; the next invocation
    starts without --unlock and ends the dead invocation's runs as KILLED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(snakemake_command(tmp_path, uri=uri), env=snakemake_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record_path = tmp_path / "results" / "tiny" / PARENT_FILE
    running: list[str] = []
    deadline = time.monotonic() + 600
    try:
        while not running and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            record = json.loads(record_path.read_text()) if record_path.is_file() else {}
            if record.get("run_id"):
                running = [run.info.run_id for run in tracking.child_runs(uri, record["run_id"])
                           if run.info.status == "RUNNING"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the invocation and every job it started
        proc.wait()
    assert running, "no job's run was seen RUNNING before the study ended"
    dead_parent = record["run_id"]
    assert list((tmp_path / ".snakemake" / "locks").glob("*.lock")), "the killed study left no lock"
    # one small target that the next invocation must make (the killed one may have made it already: only
    # an invocation with jobs to run starts, and so recovers); --rerun-incomplete: set by both profiles
    target = "results/tiny/splits/synth-a/profile.safetensors"
    (tmp_path / target).unlink(missing_ok=True)
    again = snakemake(tmp_path, "--rerun-incomplete", target, uri=uri)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "removed the stale Snakemake lock" in output and "cannot be locked" not in output
    assert "of an earlier invocation that died as KILLED" in output
    assert "ended as KILLED" not in output  # no job of this invocation was killed
    client = tracking.client(uri)
    assert client.get_run(dead_parent).info.status == "KILLED"
    for run_id in running:
        assert client.get_run(run_id).info.status == "KILLED"
    assert not [r for r in tracking.child_runs(uri, dead_parent) if r.info.status == "RUNNING"]
    new_parent = json.loads(record_path.read_text())["run_id"]
    assert new_parent != dead_parent and client.get_run(new_parent).info.status == "FINISHED"
