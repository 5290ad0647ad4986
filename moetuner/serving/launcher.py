"""Launch one torchrun per node with a static rendezvous, watch them, and end the job on any failure.

On one machine each emulated node is its own torchrun (inside its network namespace when the cluster
is emulated); on a real cluster each node runs the same torchrun command with its own --node-rank
(see docs/serving.md for the srun form). A rank that dies, hangs or cannot reach the others ends the
whole job within `timeout_s` with LaunchError naming the rank and the cause; every process the
launcher started (torchrun and its workers) is killed, none is left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

POLL_S = 0.2


class LaunchError(RuntimeError):
    """The serving job failed; the message names the rank and the cause."""


@dataclass(frozen=True)
class NodeCommand:
    node: int
    argv: list[str]
    env: dict[str, str]
    log: Path
    label: str = ""  # how failures name it; default "node <node>"

    @property
    def name(self) -> str:
        return self.label or f"node {self.node}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_argv(node: int, nodes: int, ranks_per_node: int, master_addr: str, master_port: int,
                  config: Path) -> list[str]:
    """The torchrun command of one node (static rendezvous: node rank is honoured)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
            f"--nproc-per-node={ranks_per_node}", f"--node-rank={node}", f"--master-addr={master_addr}",
            f"--master-port={master_port}", "-m", "moetuner.serving.worker", str(config)]


def rank_env(rank: int, world: int, ranks_per_node: int, master_addr: str, master_port: int,
             ifname: str) -> dict[str, str]:
    """What torchrun would give rank `rank`: the env:// rendezvous variables, and gloo's interface."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % ranks_per_node),
            "LOCAL_WORLD_SIZE": str(ranks_per_node), "GROUP_RANK": str(rank // ranks_per_node),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "GLOO_SOCKET_IFNAME": ifname,
            "OMP_NUM_THREADS": "1"}


CLONE_NEWNET = 0x40000000


def spawner_argv(spec: Path) -> list[str]:
    """The one process that starts every emulated rank (see `spawn_ranks`)."""
    return [sys.executable, "-m", "moetuner.serving.launcher", str(spec)]


def write_spawn_spec(path: Path, config: Path, namespaces: list[str | None], envs: list[dict[str, str]],
                     logs: list[Path]) -> Path:
    """The ranks `spawn_ranks` starts: rank r runs in namespace namespaces[r] (None: this one) with
    envs[r], logging to logs[r]."""
    from moetuner.atomic import write_json_atomic

    write_json_atomic(path, {"config": str(config), "ranks": [
        {"netns": ns, "env": env, "log": str(log)} for ns, env, log in zip(namespaces, envs, logs)]})
    return path


def _enter_netns(name: str) -> None:
    import ctypes

    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns into network namespace {name} failed")
    os.close(fd)


def _rank_child(config: str, rank: dict) -> None:
    """In a forked child: enter the rank's namespace, log to its file, run the worker; never returns."""
    code = 1
    try:
        fd = os.open(rank["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if rank["netns"]:
            _enter_netns(rank["netns"])
        os.environ.update(rank["env"])
        from moetuner.serving import worker

        worker.main([config])
        code = 0
    except BaseException:  # noqa: BLE001 - the child reports any failure in its log and exit code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn_ranks(spec_path: Path) -> int:
    """Import the worker once, fork one child per rank (each enters its own namespace), wait for all.

    On the first child that fails, kill the others and print a torchrun-like root-cause summary
    (rank, exit code, the last error line of its log) for `failure_cause`; return 1. Saves every rank
    the seconds of CPU that importing torch costs (16 ranks on 2 cores)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from moetuner.serving import worker  # noqa: F401 - imported once, before forking

    spec = json.loads(Path(spec_path).read_text())
    children: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for r, rank in enumerate(spec["ranks"]):
        pid = os.fork()
        if pid == 0:
            _rank_child(spec["config"], rank)
        children[pid] = r
    while children:
        pid, status = os.wait()
        code = os.waitstatus_to_exitcode(status)
        r = children.pop(pid)
        if code != 0:
            for other in children:
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for other in children:
                os.waitpid(other, 0)
            log = Path(spec["ranks"][r]["log"])
            cause = f"Signal {-code} ({signal.Signals(-code).name}) received" if code < 0 else f"see {log}"
            errors = [line for line in (log.read_text(errors="replace").splitlines() if log.is_file() else [])
                      if re.match(r"^\S*(?:Error|Exception)\b", line)]
            print(f"Root Cause (first observed failure):\n  rank      : {r} (local_rank: "
                  f"{rank_local(spec, r)})\n  exitcode  : {code} (pid: {pid})\n  traceback : {cause}")
            if errors:
                print(errors[-1])
            return 1
    return 0


def rank_local(spec: dict, rank: int) -> str:
    return spec["ranks"][rank]["env"].get("LOCAL_RANK", "?")


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def kill_tree(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every started process and all their descendants, then reap them."""
    pids = [p.pid for p in procs if p.poll() is None]
    for pid in [d for pid in pids for d in descendants(pid)] + pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def failure_cause(log: Path) -> str:
    """The failed rank and cause from torchrun's failure summary and the last error line of a log."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    errors = [e for e in re.findall(r"^\S*(?:Error|Exception)\b.*$", text, re.MULTILINE)
              if "ChildFailedError" not in e]
    text = text.split("Root Cause", 1)[-1]
    parts = []
    for key in ("rank", "exitcode", "traceback"):
        m = re.search(rf"^\s*{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            parts.append(f"{key} {m.group(1).strip()}")
    if errors:
        parts.append(errors[-1].strip()[:300])
    return "; ".join(parts) or "no failure summary in the log"


def unfinished_ranks(out: Path, world: int) -> str:
    """'rank r (phase)' for every rank that has not reported done."""
    left = []
    for rank in range(world):
        path = out / "status" / f"rank{rank}.json"
        phase = json.loads(path.read_text())["phase"] if path.is_file() else "not started"
        if phase != "done":
            left.append(f"rank {rank} ({phase})")
    return ", ".join(left) or "none"


@contextmanager
def terminate_on_signal() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so clean-up in `finally` blocks runs."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_nodes(commands: list[NodeCommand], out: Path, world: int, timeout_s: float) -> float:
    """Start every node's command, wait for all; kill all on the first failure or after timeout_s."""
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    try:
        for cmd in commands:
            cmd.log.parent.mkdir(parents=True, exist_ok=True)
            with open(cmd.log, "w") as log:
                procs.append(subprocess.Popen(cmd.argv, stdout=log, stderr=subprocess.STDOUT,
                                              env={**os.environ, **cmd.env}, start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                node = commands[failed[0]]
                raise LaunchError(f"{node.name} exited with code {codes[failed[0]]}: "
                                  f"{failure_cause(node.log)} (log: {node.log})")
            if all(c == 0 for c in codes):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise LaunchError(f"job did not finish within timeout_s={timeout_s}: unfinished "
                                  f"{unfinished_ranks(out, world)} (hung, or cannot reach the others); "
                                  f"logs in {commands[0].log.parent}")
            time.sleep(POLL_S)
    finally:
        kill_tree(procs)


if __name__ == "__main__":
    assert len(sys.argv) == 2, "usage: python -m moetuner.serving.launcher SPEC.json (started by moetuner-serve)"
    sys.exit(spawn_ranks(Path(sys.argv[1])))
