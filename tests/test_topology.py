"""moetuner.topology: presets load, and every inconsistent topology is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.topology import TopologyError, topology_from_config

PRESETS = sorted((PROJECT_ROOT / "conf" / "topology").glob("*.yaml"))


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "topology" / f"{name}.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_load(path: Path) -> None:
    topo = topology_from_config(OmegaConf.load(path))
    assert topo.name == path.stem
    assert topo.num_gpus == topo.nodes * topo.gpus_per_node
    bw = topo.bandwidth()
    assert bw.shape == (topo.num_gpus, topo.num_gpus)
    assert np.isinf(np.diag(bw)).all()
    assert (bw[~np.eye(topo.num_gpus, dtype=bool)] > 0).all()


def test_h200_2x8_links_by_hand() -> None:
    topo = topology_from_config(preset("h200_2x8"))
    bw = topo.bandwidth()
    assert topo.num_gpus == 16
    assert bw[0, 7] == 450e9 and bw[8, 15] == 450e9  # same node: NVLink
    assert bw[0, 8] == 50e9 and bw[15, 0] == 50e9  # across nodes: InfiniBand
    assert topo.node_of(9) == 1
    assert topo.gpu_peak_flops == 989e12 and topo.hbm_bw == 4800e9


def test_slots_per_gpu_is_ceil_plus_replicas() -> None:
    topo = topology_from_config(preset("cpu_2x2"))  # 4 GPUs
    assert topo.slots_per_gpu(8) == 2
    assert topo.slots_per_gpu(6, replicas=1) == 3  # ceil(6/4) + 1
    assert topo.slots_per_gpu(64, replicas=2) == 18


def test_bandwidth_matrix_overrides_links() -> None:
    cfg = preset("cpu_2x2")
    cfg["bandwidth_matrix_GBps"] = [[1, 2, 3, 4], [2, 1, 5, 6], [3, 5, 1, 7], [4, 6, 7, 1]]
    bw = topology_from_config(cfg).bandwidth()
    assert bw[0, 3] == 4e9 and bw[2, 3] == 7e9
    assert np.isinf(bw[1, 1])


@pytest.mark.parametrize("key,value,message", [
    ("nodes", 0, "must both be >= 1"),
    ("gpus_per_node", 0, "must both be >= 1"),
    ("intra_node_bw_GBps", 0.0, "intra_node_bw_GBps must be positive"),
    ("inter_node_bw_GBps", -1.0, "inter_node_bw_GBps must be positive"),
    ("max_slots_per_gpu", 0, "max_slots_per_gpu must be >= 1"),
    ("bandwidth_matrix_GBps", [[1, 2, 3, 4], [1, 2, 3, 4]], "must be square"),
    ("bandwidth_matrix_GBps", [[1, 2], [2, 1]], "is 2x2 but the topology has 4 GPUs"),
    ("bandwidth_matrix_GBps", [[1, 0, 1, 1]] * 4, "positive off-diagonal"),
])
def test_invalid_topologies(key: str, value: object, message: str) -> None:
    cfg = preset("cpu_2x2")
    cfg[key] = value
    with pytest.raises(TopologyError, match=message):
        topology_from_config(cfg)


def test_slots_that_cannot_hold_every_expert() -> None:
    cfg = preset("cpu_2x2")
    cfg["max_slots_per_gpu"] = 2
    topo = topology_from_config(cfg)
    topo.check_fits(8)  # 4 GPUs x 2 slots hold 8 experts
    with pytest.raises(TopologyError, match="cannot hold 9 experts"):
        topo.check_fits(9)
    with pytest.raises(TopologyError, match="3 expert slots per GPU needed"):
        topo.slots_per_gpu(8, replicas=1)
    with pytest.raises(TopologyError, match="replicas must be >= 0"):
        topo.slots_per_gpu(8, replicas=-1)


def test_unknown_preset_lists_the_presets() -> None:
    from moetuner.topology import topology_preset

    assert topology_preset("cpu_2x2")["nodes"] == 2
    with pytest.raises(TopologyError, match="no topology preset 'nope'.*h100_1x8"):
        topology_preset("nope")
