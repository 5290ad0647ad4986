"""The emulated cluster: namespaces, rate-limited veths, and clean removal; loopback without root."""

from __future__ import annotations

import subprocess

import pytest
from omegaconf import OmegaConf

from moetuner.apps.serve import use_netns
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
