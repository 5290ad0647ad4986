"""An emulated multi-node cluster on one machine: one network namespace per node (root only).

Node n gets namespace `mt<pid>n<n>` with a veth `mt<pid>v<n>` (address 10.213.<subnet>.<n+1>/24)
whose peer joins the bridge `mt<pid>br` in the root namespace. Both ends of every veth get a `tbf`
rate limit of the topology's inter-node bandwidth, so node-to-node traffic is rate limited in each
direction; ranks of one node talk over their namespace's loopback (not limited). The kernel has no
`netem`, so link latency is NOT emulated (the calibration measures the real per-message cost).
The bridge has no address: nothing leaves this machine. `close()` removes everything; it runs on
exit, on failure and on SIGINT/SIGTERM (see `emulated_cluster`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PREFIX = "mt"


class NetnsError(ValueError):
    """Network namespaces cannot be set up here; the message says why and what to do."""


def netns_unavailable_reason() -> str | None:
    """None when namespaces can be made (root, `ip` and `tc` present), else the reason."""
    if os.geteuid() != 0:
        return "not running as root: network namespaces need root; runs use loopback instead"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2); runs use loopback instead"
    return None


def _sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise NetnsError(f"`{' '.join(args)}` failed: {done.stderr.strip()}")


@dataclass
class EmulatedCluster:
    """Namespaces, veths and a bridge for `nodes` nodes, links limited to `rate_bytes_per_s`."""

    nodes: int
    rate_bytes_per_s: float
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    created: list[tuple[str, str]] = field(default_factory=list)  # ("netns"|"link", name), in order

    @property
    def subnet(self) -> int:
        return os.getpid() % 250 + 1

    def namespace(self, node: int) -> str:
        return f"{self.tag}n{node}"

    def interface(self, node: int) -> str:
        return f"{self.tag}v{node}"

    def address(self, node: int) -> str:
        return f"10.213.{self.subnet}.{node + 1}"

    def exec_prefix(self, node: int) -> list[str]:
        """Command prefix that runs a program inside node's namespace."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def _tbf(self, prefix: list[str], dev: str) -> None:
        rate = f"{int(self.rate_bytes_per_s * 8)}bit"
        burst = str(max(32 * 1024, int(self.rate_bytes_per_s / 250)))  # >= one 4 ms timer tick
        _sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
            "latency", "400ms")

    def open(self) -> "EmulatedCluster":
        bridge = f"{self.tag}br"
        _sh("ip", "link", "add", bridge, "type", "bridge")
        self.created.append(("link", bridge))
        _sh("ip", "link", "set", bridge, "up")
        for node in range(self.nodes):
            ns, dev, peer = self.namespace(node), self.interface(node), f"{self.tag}p{node}"
            _sh("ip", "netns", "add", ns)
            self.created.append(("netns", ns))
            _sh("ip", "link", "add", dev, "type", "veth", "peer", "name", peer)
            self.created.append(("link", peer))
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "link", "set", peer, "master", bridge, "up")
            inside = self.exec_prefix(node)
            _sh(*inside, "ip", "addr", "add", f"{self.address(node)}/24", "dev", dev)
            _sh(*inside, "ip", "link", "set", dev, "up")
            _sh(*inside, "ip", "link", "set", "lo", "up")
            self._tbf(inside, dev)
            self._tbf([], peer)
        return self

    def close(self) -> None:
        """Remove what was created, newest first; never raises."""
        while self.created:
            kind, name = self.created.pop()
            cmd = ["ip", "netns", "delete", name] if kind == "netns" else ["ip", "link", "delete", name]
            subprocess.run(cmd, capture_output=True)


def leftover_namespaces(tag: str = PREFIX) -> list[str]:
    """Names of namespaces starting with `tag` (for checks that nothing was left behind)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag)]


@contextmanager
def emulated_cluster(nodes: int, rate_bytes_per_s: float) -> Iterator[EmulatedCluster]:
    """Set up the emulated cluster; remove it on exit, error or interrupt."""
    cluster = EmulatedCluster(nodes, rate_bytes_per_s)
    try:
        yield cluster.open()
    finally:
        cluster.close()
