"""The emulated cluster: namespaces, rate-limited veths, and clean removal; loopback without root."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from moetuner.serving.run import use_netns
from moetuner.serving import netns
from moetuner.topology import topology_from_config


def test_without_root_runs_use_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "not running as root" in netns.netns_unavailable_reason()
    topo = topology_from_config(OmegaConf.load("conf/topology/cpu_2x2.yaml"))
    cfg = OmegaConf.create({"launch": {"netns": "auto", "node_rank": None}})
    assert use_netns(cfg, topo) is False
    cfg.launch.netns = "true"
    with pytest.raises(RuntimeError, match="not running as root"):
        use_netns(cfg, topo)


def test_namespaces_are_rate_limited_and_removed() -> None:
    reason = netns.netns_unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    rate = 0.125e9  # 1 Gbit/s
    with netns.emulated_cluster(2, rate) as net:
        assert set(netns.leftover_namespaces(net.tag)) == {net.namespace(0), net.namespace(1)}
        qdisc = subprocess.run(net.exec_prefix(1) + ["tc", "qdisc", "show", "dev", net.interface(1)],
                               capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdisc and "rate 1Gbit" in qdisc
    assert netns.leftover_namespaces(net.tag) == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert net.tag not in links


SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5001)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if t0 is None:
        t0 = time.perf_counter()
    if not b:
        break
    n += len(b)
print(n / (time.perf_counter() - t0), flush=True)
"""
CLIENT = "import socket, sys; c = socket.create_connection((sys.argv[1], 5001)); c.sendall(b'x' * int(sys.argv[2]))"


def transfer_rate(net: netns.RankNetwork, src: int, dst: int, nbytes: int) -> float:
    """Payload bytes/s of one TCP transfer from rank src to rank dst, timed at the receiver."""
    server = subprocess.Popen(net.exec_prefix(dst) + [sys.executable, "-c", SERVER, net.address(dst)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        subprocess.run(net.exec_prefix(src) + [sys.executable, "-c", CLIENT, net.address(dst), str(nbytes)],
                       check=True, timeout=30)
        return float(server.stdout.readline())
    finally:
        server.kill()
        server.wait()


def test_rank_ports_are_shaped_to_the_configured_rates() -> None:
    """2 nodes x 2 ranks: rank 0 -> 1 (same node) at the intra rate, rank 0 -> 2 at the inter rate."""
    reason = netns.netns_unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    intra, inter = 8e6, 2e6  # payload B/s; 0.6 s transfers
    with netns.rank_network(2, 2, intra, inter) as net:
        assert set(netns.leftover_namespaces(net.tag)) == {net.namespace(r) for r in range(4)}
        assert net.address(1) == "10.213.0.2" and net.address(2) == "10.213.1.1"
        assert transfer_rate(net, 0, 1, int(0.6 * intra)) == pytest.approx(intra, rel=0.1)
        assert transfer_rate(net, 0, 2, int(0.6 * inter)) == pytest.approx(inter, rel=0.1)
    assert netns.leftover_namespaces(net.tag) == []
    assert net.tag not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_rank_network_is_removed_after_failure_and_sigterm(tmp_path) -> None:
    reason = netns.netns_unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with pytest.raises(RuntimeError, match="boom"):
        with netns.rank_network(1, 2, 1e6, 1e6) as net:
            assert len(netns.leftover_namespaces(net.tag)) == 2
            raise RuntimeError("boom")
    assert netns.leftover_namespaces(net.tag) == []
    # a process holding a network gets SIGTERM: terminate_on_signal turns it into clean-up
    script = ("import sys, time\nfrom moetuner.serving import netns\nfrom moetuner.serving.launcher import "
              "terminate_on_signal\nwith terminate_on_signal(), netns.rank_network(2, 2, 1e6, 1e6) as net:\n"
              "    print(net.tag, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    tag = proc.stdout.readline().strip()
    assert len(netns.leftover_namespaces(tag)) == 4
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert netns.leftover_namespaces(tag) == []
    assert tag not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_emulation_without_root_is_refused_or_unshaped(monkeypatch: pytest.MonkeyPatch) -> None:
    from moetuner.serving.run import emulation_settings
    from moetuner.serving.emulation import EmulationError

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    cfg = OmegaConf.create({"mode": "replay", "launch": {"node_rank": None},
                            "emulation": {"enabled": "true", "dilation": 100, "compute": "timed"}})
    with pytest.raises(EmulationError, match="not running as root.*enabled=auto"):
        emulation_settings(cfg)
    cfg.emulation.enabled = "auto"
    settings, shaped = emulation_settings(cfg)
    assert settings.enabled is True and shaped is False
    cfg.emulation.compute = "fast"
    with pytest.raises(EmulationError, match="compute='fast'"):
        emulation_settings(cfg)
