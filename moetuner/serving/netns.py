"""An emulated multi-node cluster on one machine: one network namespace per node (root only).

Node n gets namespace `mt<pid>n<n>` with a veth `mt<pid>v<n>` (address 10.213.<subnet>.<n+1>/24)
whose peer joins the bridge `mt<pid>br` in the root namespace. Both ends of every veth get a `tbf`
rate limit of the topology's inter-node bandwidth, so node-to-node traffic is rate limited in each
direction; ranks of one node talk over their namespace's loopback (not limited). The kernel has no
`netem`, so link latency is NOT emulated (the calibration measures the real per-message cost).
The bridge has no address: nothing leaves this machine. `close()` removes everything; it runs on
exit, on failure and on SIGINT/SIGTERM (see `emulated_cluster`).

`RankNetwork` (emulation of a target topology, see moetuner/serving/emulation.py) goes further:
one namespace per rank, so traffic between ranks of one node is shaped too. Rank r of node n gets
namespace `mt<pid>r<r>` and veth `mt<pid>v<r>` (10.213.<n>.<local+1>/16) whose peer joins one
bridge. Each end of every veth has an HTB qdisc with two classes, intra-node (peer address in
10.213.<n>.0/24) and inter-node (all else): on the rank's end they limit what the rank sends, on the
bridge end what it receives, so a rank has an NVLink-like and a NIC-like port of its own, each
full duplex, as a GPU has.
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


def add_bridge(tag: str, created: list[tuple[str, str]]) -> str:
    """Bridge `<tag>br` in the root namespace, up, with no address (nothing leaves the machine)."""
    bridge = f"{tag}br"
    _sh("ip", "link", "add", bridge, "type", "bridge")
    created.append(("link", bridge))
    _sh("ip", "link", "set", bridge, "up")
    return bridge


def add_port(ns: str, dev: str, peer: str, bridge: str, created: list[tuple[str, str]],
             link_args: tuple[str, ...] = ()) -> None:
    """Namespace `ns` with veth `dev` inside, its peer `peer` on `bridge`; link_args go to both ends."""
    _sh("ip", "netns", "add", ns)
    created.append(("netns", ns))
    _sh("ip", "link", "add", dev, *link_args, "type", "veth", "peer", "name", peer, *link_args)
    created.append(("link", peer))
    _sh("ip", "link", "set", dev, "netns", ns)
    _sh("ip", "link", "set", peer, "master", bridge, "up")


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
        bridge = add_bridge(self.tag, self.created)
        for node in range(self.nodes):
            ns, dev, peer = self.namespace(node), self.interface(node), f"{self.tag}p{node}"
            add_port(ns, dev, peer, bridge, self.created)
            inside = self.exec_prefix(node)
            _sh(*inside, "ip", "addr", "add", f"{self.address(node)}/24", "dev", dev)
            _sh(*inside, "ip", "link", "set", dev, "up")
            _sh(*inside, "ip", "link", "set", "lo", "up")
            self._tbf(inside, dev)
            self._tbf([], peer)
        return self

    def close(self) -> None:
        """Remove what was created, newest first; never raises."""
        remove(self.created)


def remove(created: list[tuple[str, str]]) -> None:
    """Delete the namespaces and links in `created` ((kind, name), oldest first), newest first; emptied."""
    while created:
        kind, name = created.pop()
        cmd = ["ip", "netns", "delete", name] if kind == "netns" else ["ip", "link", "delete", name]
        subprocess.run(cmd, capture_output=True)


UNMETERED_BYTES = 66 + 48
"""Bytes of each packet HTB does not meter (a size table with this negative overhead): TCP/IP headers
(Ethernet 14, IPv4 20, TCP with timestamps 32) and gloo's 48-byte message preamble. A payload packet
is then metered at its payload bytes, as the simulator counts them, and the protocol's own packets
(ACKs, gloo's ready notices: headers and a preamble) cost next to nothing. Metering them would charge
a phase per message, not per byte: with rows of a few hundred bytes most messages are one packet,
and the headers, preambles and notices added 25-50% to them."""


BURST_S = 0.5e-3
"""HTB bucket: 0.5 ms of traffic, so late timer wake-ups do not lose rate. No more: a full bucket
lets a phase's first bytes pass unpaced (HTB still sends one packet when the bucket is not empty)."""


def _htb(tc: list[str], dev: str, match: str, node: int, intra: float, inter: float) -> list[list[str]]:
    """tc commands: HTB on `dev`, class 1:10 (peer `match` address in node's /24) at intra B/s,
    class 1:20 (everything else, the default) at inter B/s; rates are payload rates."""
    cmds = [[*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "stab", "overhead", f"-{UNMETERED_BYTES}",
             "htb", "default", "20"]]
    for cls, rate in (("1:10", intra), ("1:20", inter)):
        bits = f"{int(rate * 8)}bit"
        burst = str(max(64, int(rate * BURST_S)))
        cmds.append([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", cls, "htb", "rate", bits,
                     "ceil", bits, "burst", burst, "cburst", burst, "quantum", "1514"])
    cmds.append([*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                 "match", "ip", match, f"10.213.{node}.0/24", "flowid", "1:10"])
    return cmds


@dataclass
class RankNetwork:
    """One namespace per rank on one bridge; HTB per rank port: intra- and inter-node payload B/s."""

    nodes: int
    ranks_per_node: int
    intra_bytes_per_s: float
    inter_bytes_per_s: float
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    created: list[tuple[str, str]] = field(default_factory=list)  # ("netns"|"link", name), in order

    def __post_init__(self) -> None:
        if not (1 <= self.nodes <= 250 and 1 <= self.ranks_per_node <= 250):
            raise NetnsError(f"{self.nodes} nodes x {self.ranks_per_node} ranks: the emulated network "
                             f"addresses at most 250 nodes of 250 ranks")
        if min(self.intra_bytes_per_s, self.inter_bytes_per_s) < 1000:
            raise NetnsError(f"link rates {self.intra_bytes_per_s:.0f} / {self.inter_bytes_per_s:.0f} B/s are "
                             f"below 1 kB/s; lower emulation.dilation")

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def namespace(self, rank: int) -> str:
        return f"{self.tag}r{rank}"

    def interface(self, rank: int) -> str:
        return f"{self.tag}v{rank}"

    def address(self, rank: int) -> str:
        node, local = divmod(rank, self.ranks_per_node)
        return f"10.213.{node}.{local + 1}"

    def exec_prefix(self, rank: int) -> list[str]:
        """Command prefix that runs a program inside rank's namespace."""
        return ["ip", "netns", "exec", self.namespace(rank)]

    def open(self) -> "RankNetwork":
        bridge = add_bridge(self.tag, self.created)
        for rank in range(self.world):
            ns, dev, peer = self.namespace(rank), self.interface(rank), f"{self.tag}p{rank}"
            node = rank // self.ranks_per_node
            # no segmentation offload (1 segment per skb): HTB meters MTU-sized packets, not 64 kB
            # GSO bursts that would end a phase's transfer early by up to one burst
            add_port(ns, dev, peer, bridge, self.created, ("txqueuelen", "10000", "gso_max_segs", "1"))
            inside = ["ip", "-n", ns]
            _sh(*inside, "addr", "add", f"{self.address(rank)}/16", "dev", dev)
            _sh(*inside, "link", "set", dev, "up")
            _sh(*inside, "link", "set", "lo", "up")
            # TCP windows must not pace the emulated links: a phase's message to a peer leaves at once
            # (large initial windows, no slow start after the idle gap between phases); HTB paces it
            _sh(*inside, "route", "replace", "10.213.0.0/16", "dev", dev, "src", self.address(rank),
                "initcwnd", "100", "initrwnd", "100")
            _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0")
            for cmd in (_htb(["tc", "-n", ns], dev, "dst", node, self.intra_bytes_per_s, self.inter_bytes_per_s)
                        + _htb(["tc"], peer, "src", node, self.intra_bytes_per_s, self.inter_bytes_per_s)):
                _sh(*cmd)
        return self

    def close(self) -> None:
        """Remove what was created, newest first; never raises."""
        remove(self.created)


@contextmanager
def rank_network(nodes: int, ranks_per_node: int, intra_bytes_per_s: float,
                 inter_bytes_per_s: float) -> Iterator[RankNetwork]:
    """Set up one shaped namespace per rank; remove everything on exit, error or interrupt."""
    net = RankNetwork(nodes, ranks_per_node, intra_bytes_per_s, inter_bytes_per_s)
    try:
        yield net.open()
    finally:
        net.close()


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
