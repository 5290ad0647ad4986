"""A study that starts cleanly after a crash, and refuses to start against a tracking server that is down.

The Snakefile calls these (docs/study.md, "Crashes and killed jobs"):
- `release_stale_lock` when a main invocation parses the Snakefile: Snakemake's lock in `.snakemake/locks`
  left by an invocation that died (SIGKILL, a lost login session) is removed, and the run says so, when
  nothing of the study is alive in this folder: no snakemake or study job process on this host, no Slurm
  job (squeue) working here. Otherwise it names what holds the lock, or the command to run.
- `before_start` in `onstart` (the lock is held, no job is submitted yet): an http(s) tracking URI must
  answer (else `TrackingServerDown`, naming MLFLOW_TRACKING_URI); records this invocation's host and pid;
  ends as KILLED the RUNNING parent runs of this results folder (their invocations are dead, since this
  one holds the lock) and their RUNNING child runs.
- `end_orphan_children` in `onsuccess`/`onerror`: every job is over, so a child run still RUNNING
  belongs to a job that was killed (scancel, a Slurm time limit, the OOM killer): it ends as KILLED.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from snakemake.exceptions import WorkflowError

from moetuner import tracking
from moetuner.atomic import write_json_atomic
from moetuner.study.parent_run import read_parent

log = logging.getLogger(__name__)

INVOCATION_FILE = Path(".snakemake") / "moetuner-invocation.json"
RESULTS_TAG = "moetuner.results"
HOST_TAG = "moetuner.host"
PID_TAG = "moetuner.pid"
PROBE_TIMEOUT_S = 10


class TrackingServerDown(WorkflowError):
    """The tracking server named by MLFLOW_TRACKING_URI (or mlflow.tracking_uri) does not answer."""


def say(message: str) -> None:
    print(f"moetuner study: {message}", flush=True)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _is_study_process(argv: list[str]) -> bool:
    """snakemake (any entry point) or a study job wrapper (`python -m moetuner.study job`)."""
    head = argv[:3]
    return any(Path(a).name.startswith("snakemake") for a in head) or "moetuner.study" in head


def live_study_processes(workdir: Path) -> list[str]:
    """'pid: command' of the processes on this host that run snakemake or a study job in `workdir`
    (this process and its ancestors aside)."""
    mine, found = _ancestors(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) in mine or Path(os.readlink(proc / "cwd")).resolve() != workdir:
                continue
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if _is_study_process(argv):
            found.append(f"{proc.name}: {' '.join(argv)[:120]}")
    return found


def slurm_jobs_in(workdir: Path) -> list[str]:
    """Ids of this user's Slurm jobs (pending or running) whose working folder is `workdir`; [] without Slurm."""
    try:
        out = subprocess.run(["squeue", "-h", "--me", "-o", "%i|%Z"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [job for job, _, folder in (line.partition("|") for line in out.splitlines())
            if folder and Path(folder).resolve() == workdir]


def release_stale_lock(workdir: str | Path) -> bool:
    """Remove Snakemake's lock of `workdir` when the invocation that took it is dead; True if removed."""
    workdir = Path(workdir).resolve()
    locks = sorted((workdir / ".snakemake" / "locks").glob("*.lock"))
    if not locks:
        return False
    record_path = workdir / INVOCATION_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("host", socket.gethostname()) != socket.gethostname():
        say(f"{workdir} is locked by the invocation started on host {record['host']} (pid {record['pid']}); "
            f"this host cannot see it. If it is no longer running, run the same snakemake command with --unlock")
        return False
    holders = live_study_processes(workdir) + [f"Slurm job {j}" for j in slurm_jobs_in(workdir)]
    if holders:
        say(f"{workdir} is locked by a running study: {'; '.join(holders)}. Wait for it, or stop it "
            f"(scancel for Slurm jobs) and run the same snakemake command with --unlock")
        return False
    for lock in locks:
        lock.unlink(missing_ok=True)
    say(f"removed the stale Snakemake lock of {workdir}: the invocation that took it is gone (no snakemake, "
        f"study job or Slurm job runs in this folder); the outputs of its unfinished jobs are rerun with "
        f"--rerun-incomplete (set by both profiles)")
    return True


def require_tracking_server(uri: str) -> None:
    """Raise TrackingServerDown unless an http(s) `uri` answers (any HTTP status counts as an answer)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as err:
        raise TrackingServerDown(
            f"the MLflow tracking server {uri} does not answer ({getattr(err, 'reason', err)}). It comes from "
            f"MLFLOW_TRACKING_URI (or mlflow.tracking_uri in the study config): start the server "
            f"(docs/study.md, 'Many nodes'), or unset MLFLOW_TRACKING_URI to track into sqlite:///mlflow.db "
            f"in the project root. No job was submitted.") from None


def invocation_tags(results: str | Path) -> dict[str, str]:
    """Tags of a parent run that let a later invocation find it: the results folder, host and pid."""
    return {RESULTS_TAG: str(Path(results).resolve()), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _kill_run_and_children(client, uri: str, run_id: str) -> int:
    """End `run_id` and its RUNNING children as KILLED; return how many runs were ended."""
    children = tracking.end_running_children(uri, run_id)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")
        return len(children) + 1
    return len(children)


def end_dead_invocations(results: str | Path, experiment: str, uri: str) -> int:
    """End as KILLED the RUNNING parent runs of `results` (and their RUNNING children); return the count.
    Called while this invocation holds the lock, so any earlier invocation of this folder is dead."""
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    dead = {run.info.run_id for run in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RESULTS_TAG}` = '{Path(results).resolve()}' "
                                           f"and attributes.status = 'RUNNING'", max_results=1000)}
    record = read_parent(results) or {}
    if record.get("run_id") and record.get("tracking_uri") == uri:
        dead.add(record["run_id"])  # a parent made before the results tag existed
    return sum(_kill_run_and_children(client, uri, run_id) for run_id in sorted(dead))


def before_start(results: str | Path, experiment: str, uri: str) -> None:
    """`onstart`: check the tracking server, record this invocation, end the runs of dead invocations."""
    require_tracking_server(uri)
    write_json_atomic(INVOCATION_FILE, {"host": socket.gethostname(), "pid": os.getpid()})
    try:
        ended = end_dead_invocations(results, experiment, uri)
    except Exception as err:  # noqa: BLE001 - tracking never stops the study (as in moetuner.study)
        log.warning("MLflow: could not end the runs of earlier invocations at %s (%s)", uri, err)
        return
    if ended:
        say(f"MLflow: ended {ended} run(s) of an earlier invocation that died as KILLED")


def end_orphan_children(results: str | Path) -> int:
    """`onsuccess`/`onerror`: end as KILLED the child runs of this invocation still RUNNING; return the count."""
    record = read_parent(results) or {}
    if not record.get("run_id"):
        return 0
    try:
        runs = tracking.end_running_children(record["tracking_uri"], record["run_id"])
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow: could not end the runs of killed jobs (%s)", err)
        return 0
    if runs:
        say(f"MLflow: {len(runs)} job run(s) never ended (their jobs were killed): "
            f"{', '.join(run.info.run_name for run in runs)}; ended as KILLED")
    return len(runs)
