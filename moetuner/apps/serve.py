"""moetuner-serve: run the expert-parallel serving benchmark (replay or model mode) under torchrun.

    moetuner-serve mode=replay trace=T.safetensors placement=P.json topology=cpu_2x2 out=DIR
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_text_atomic
from moetuner.placement.layout import Placement, PlacementError, load_placement
from moetuner.serving.launcher import NodeCommand, free_port, run_nodes, terminate_on_signal, torchrun_argv
from moetuner.serving.netns import emulated_cluster, netns_unavailable_reason
from moetuner.topology import Topology, topology_from_config
from moetuner.trace import load_trace

MODES = ("replay", "model")


def model_shape(cfg: DictConfig) -> tuple[int, int]:
    """(MoE layers, experts) of the workload: from the trace (replay) or the checkpoint (model)."""
    if cfg.mode == "replay":
        trace = load_trace(cfg.trace)
        return trace.num_layers, trace.num_experts
    from moetuner.serving.model import moe_shape

    return moe_shape(cfg.model.path)


def check_placement(placement: Placement, topology: Topology, num_layers: int, num_experts: int) -> None:
    """Refuse a placement that does not fit the topology or the model, before anything launches."""
    if placement.num_gpus != topology.num_gpus or placement.num_nodes != topology.nodes:
        raise PlacementError(f"placement is for {placement.num_nodes} node(s) x {placement.num_gpus} GPUs "
                             f"but topology {topology.name} has {topology.nodes} x {topology.gpus_per_node}; "
                             f"solve it for this topology")
    required = np.ones((num_layers, num_experts), dtype=bool)
    placement.validate(num_experts, required)


def node_commands(cfg: DictConfig, topology: Topology, config: Path, addrs: list[str], ifaces: list[str],
                  prefixes: list[list[str]], port: int) -> list[NodeCommand]:
    nodes = range(topology.nodes) if cfg.launch.node_rank is None else [int(cfg.launch.node_rank)]
    return [NodeCommand(n, prefixes[n] + torchrun_argv(n, topology.nodes, topology.gpus_per_node, addrs[0],
                                                       port, config),
                        {"GLOO_SOCKET_IFNAME": ifaces[n]} if ifaces[n] else {},
                        Path(cfg.out) / "logs" / f"node{n}.log") for n in nodes]


def use_netns(cfg: DictConfig, topology: Topology) -> bool:
    """Emulate the network when asked (`launch.netns`: auto | true | false) and possible."""
    setting = str(cfg.launch.netns).lower()
    reason = netns_unavailable_reason()
    if setting == "true" and reason:
        raise RuntimeError(f"launch.netns=true but {reason}; use launch.netns=auto or false")
    return setting != "false" and reason is None and topology.nodes > 1 and cfg.launch.node_rank is None


def serve(cfg: DictConfig) -> dict:
    """Validate, write DIR/config.yaml, launch the ranks, and return DIR/metrics.json."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}; choose one of {list(MODES)}")
    topology = topology_from_config(cfg.topology)
    check_placement(load_placement(cfg.placement), topology, *model_shape(cfg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    emulate = use_netns(cfg, topology)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["launch"]["emulated_network"] = emulate
    resolved.pop("hydra", None)
    config = out / "config.yaml"
    write_text_atomic(config, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    (out / "metrics.json").unlink(missing_ok=True)
    nodes = topology.nodes
    with terminate_on_signal():
        if emulate:
            with emulated_cluster(nodes, topology.inter_node_bw) as net:
                cmds = node_commands(cfg, topology, config, [net.address(n) for n in range(nodes)],
                                     [net.interface(n) for n in range(nodes)],
                                     [net.exec_prefix(n) for n in range(nodes)], int(cfg.launch.master_port or 29500))
                run_nodes(cmds, out, topology.num_gpus, float(cfg.launch.timeout_s))
        else:
            port = int(cfg.launch.master_port or free_port())
            cmds = node_commands(cfg, topology, config, [str(cfg.launch.master_addr)] * nodes,
                                 [str(cfg.launch.get("ifname") or "lo")] * nodes, [[]] * nodes, port)
            run_nodes(cmds, out, topology.num_gpus, float(cfg.launch.timeout_s))
    return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    metrics = serve(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=1))
