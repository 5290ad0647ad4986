"""One serving-benchmark run from its config (the `serve` app's function): check, launch the ranks, read metrics.

Replay or model mode under torchrun, on one machine, over emulated nodes (network namespaces), or one node
of a real cluster (`launch.node_rank`); see docs/serving.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moetuner.atomic import write_json_atomic, write_text_atomic
from moetuner import placement as layout
from moetuner.placement import Placement, load_placement
from moetuner.serving.emulation import (EmulationError, EmulationSettings, converged_dilation, link_rates,
                                        row_scale, target_cost)
from moetuner.serving.launcher import (NodeCommand, free_port, rank_env, run_nodes, spawner_argv,
                                       terminate_on_signal, torchrun_argv, write_spawn_spec)
from moetuner.serving.netns import emulated_cluster, netns_unavailable_reason, rank_network
from moetuner.serving.replay import ReplayError, replay_settings, step_ranges
from moetuner.topology import Topology, topology_from_config
from moetuner.trace import load_trace

MODES = ("replay", "model")
log = logging.getLogger(__name__)


def model_shape(cfg: DictConfig) -> tuple[int, int]:
    """(MoE layers, experts) of the workload: from the trace (replay) or the checkpoint (model)."""
    if cfg.mode == "replay":
        trace = load_trace(cfg.trace)
        return trace.num_layers, trace.num_experts
    from moetuner.serving.model import moe_shape

    return moe_shape(cfg.model.path)


def check_placement(placement: Placement, topology: Topology, num_layers: int, num_experts: int) -> None:
    """Refuse a placement that does not fit the topology or the model, before anything launches."""
    layout.check_placement(placement, topology.num_gpus, num_experts, num_layers, topology.gpus_per_node,
                           topology=f"topology {topology.name}")


def check_replay(cfg: DictConfig) -> None:
    """Refuse replay settings that would measure no step of the trace, before any rank launches.

    Raises ReplayError naming the settings to change (replay.step_tokens, replay.warmup_steps, ...).
    """
    if cfg.mode != "replay":
        return
    settings = replay_settings(cfg.replay)
    try:
        next(step_ranges(load_trace(cfg.trace).num_tokens, settings))  # raises when no step is measured
    except ReplayError as err:
        raise ReplayError(f"trace={cfg.trace}: {err}") from None


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


def emulation_settings(cfg: DictConfig) -> tuple[EmulationSettings, bool]:
    """The `emulation` block, checked (EmulationError where it cannot run), with enabled as a bool,
    and whether the links are shaped (enabled=auto without root: ranks talk over loopback, unshaped)."""
    block = dict(cfg.get("emulation") or {})
    settings = EmulationSettings(**block)
    settings.check()
    setting = str(settings.enabled).lower()
    if setting == "false":
        return replace(settings, enabled=False), False
    if cfg.mode != "replay":
        raise EmulationError(f"emulation.enabled={setting} needs mode=replay (got mode={cfg.mode})")
    if cfg.launch.node_rank is not None:
        raise EmulationError("emulation runs every rank on this machine; drop launch.node_rank")
    reason = netns_unavailable_reason()
    if reason and setting == "true":
        raise EmulationError(f"emulation needs one shaped network namespace per rank but {reason}; "
                             f"run as root, or set emulation.enabled=auto (unshaped loopback) or false")
    if reason:
        log.warning("emulation.enabled=auto: %s; the links are NOT shaped (only latency and compute are "
                    "emulated)", reason)
    return replace(settings, enabled=True), reason is None


def auto_dilation(cfg: DictConfig, settings: EmulationSettings) -> dict:
    """Probe runs (1 step each, in DIR/probe/D<D>) at D = auto_start, 2x, 4x, ... up to auto_max; the
    smallest D whose target time the next D reproduces within auto_tolerance. Returns the probes and D."""
    probes: list[dict] = []
    dilation = float(settings.auto_start)
    while dilation <= settings.auto_max:
        probe = OmegaConf.merge(cfg, {"out": str(Path(cfg.out) / "probe" / f"D{dilation:g}"),
                                      "mlflow": {"enabled": False}, "emulation": {"dilation": dilation},
                                      "replay": {"warmup_steps": 0, "max_steps": 1}})
        metrics = serve(probe)
        probes.append({k: metrics[k] for k in ("dilation", "target_moe_layer_time_s", "predicted_moe_layer_time_s",
                                               "cpu_share")})
        chosen = converged_dilation([(p["dilation"], p["target_moe_layer_time_s"]) for p in probes],
                                    settings.auto_tolerance)
        if chosen is not None:
            return {"dilation": chosen, "converged": True, "probes": probes}
        dilation *= 2
    log.warning("emulation.dilation=auto: no D up to auto_max=%g converged; using the largest", settings.auto_max)
    return {"dilation": probes[-1]["dilation"], "converged": False, "probes": probes}


def launch_emulated(cfg: DictConfig, topology: Topology, config: Path, shaped: bool) -> None:
    """One process per rank (forked by one spawner), each in its own namespace with shaped ports
    (see serving/emulation.py); unshaped: all on loopback."""
    trace = load_trace(cfg.trace)
    cost = target_cost(topology, trace)
    scale = row_scale(trace, int(cfg.replay.shape_scale), cost)
    rates = link_rates(topology, cost, float(cfg.emulation.dilation), scale)
    world, gpn = topology.num_gpus, topology.gpus_per_node
    logs = Path(cfg.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rank_logs = [logs / f"rank{r}.log" for r in range(world)]

    def launch(namespaces: list[str | None], envs: list[dict[str, str]]) -> None:
        spec = write_spawn_spec(logs / "ranks.json", config, namespaces, envs, rank_logs)
        run_nodes([NodeCommand(0, spawner_argv(spec), {}, logs / "spawner.log", label="emulated ranks")],
                  Path(cfg.out), world, float(cfg.launch.timeout_s))

    if not shaped:
        port = int(cfg.launch.master_port or free_port())
        launch([None] * world, [rank_env(r, world, gpn, "127.0.0.1", port, "lo") for r in range(world)])
        return
    port = int(cfg.launch.master_port or 29500)
    with rank_network(topology.nodes, gpn, *rates) as net:
        launch([net.namespace(r) for r in range(world)],
               [rank_env(r, world, gpn, net.address(0), port, net.interface(r)) for r in range(world)])


def serve(cfg: DictConfig) -> dict:
    """Validate, write DIR/config.yaml, launch the ranks, and return DIR/metrics.json."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}; choose one of {list(MODES)}")
    topology = topology_from_config(cfg.topology)
    check_placement(load_placement(cfg.placement), topology, *model_shape(cfg))
    check_replay(cfg)
    emulation, shaped = emulation_settings(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = None
    if emulation.enabled and emulation.dilation == "auto":
        chosen = auto_dilation(cfg, emulation)
        write_json_atomic(out / "dilation.json", chosen)
        cfg = OmegaConf.merge(cfg, {"emulation": {"dilation": chosen["dilation"]}})
    emulate = not emulation.enabled and use_netns(cfg, topology)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["launch"]["emulated_network"] = emulate or shaped
    resolved["emulation"] = {**resolved.get("emulation", {}), "enabled": emulation.enabled}
    resolved.pop("hydra", None)
    config = out / "config.yaml"
    write_text_atomic(config, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    (out / "metrics.json").unlink(missing_ok=True)
    nodes = topology.nodes
    with terminate_on_signal():
        if emulation.enabled:
            launch_emulated(cfg, topology, config, shaped)
        elif emulate:
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
    if not (out / "metrics.json").is_file():
        return {}
    metrics = json.loads((out / "metrics.json").read_text())
    if chosen is not None:
        metrics["dilation_auto_converged"] = chosen["converged"]
        write_json_atomic(out / "metrics.json", metrics)
    if metrics.get("emulated_network"):  # rank 0 ran in a network namespace: log its run from here
        from moetuner.serving.worker import log_run  # torch: only where a run was served

        log_run(OmegaConf.create(resolved), metrics)
    return metrics
