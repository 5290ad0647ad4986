"""Cluster topologies (Hydra group `topology/`): GPUs, links and the roofline constants of a GPU."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moetuner import conf_preset


class TopologyError(ValueError):
    """A topology is inconsistent, or cannot hold a model's experts."""


@dataclass(frozen=True)
class Topology:
    """N nodes x g GPUs; bandwidths are bytes/s per GPU per direction, latencies seconds."""

    name: str
    nodes: int
    gpus_per_node: int
    intra_node_bw: float  # B/s, e.g. NVLink
    inter_node_bw: float  # B/s, e.g. one InfiniBand NIC per GPU
    intra_node_latency: float  # s per message
    inter_node_latency: float  # s per message
    gpu_peak_flops: float  # FLOP/s (bf16 dense)
    hbm_bw: float  # B/s
    max_slots_per_gpu: int | None = None  # expert slots a GPU can hold per layer (memory); None = no cap
    bandwidth_matrix: np.ndarray | None = None  # [G, G] B/s, overrides intra/inter when given
    calibration: dict[str, Any] = field(default_factory=dict)  # fitted cost constants, if any

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, gpu: np.ndarray | int) -> np.ndarray | int:
        """Node index of GPU id(s)."""
        return gpu // self.gpus_per_node

    def bandwidth(self) -> np.ndarray:
        """[G, G] link bandwidth in B/s (diagonal: inf, same-GPU traffic is free)."""
        if self.bandwidth_matrix is not None:
            bw = np.array(self.bandwidth_matrix, dtype=float)
        else:
            node = np.arange(self.num_gpus) // self.gpus_per_node
            same = node[:, None] == node[None, :]
            bw = np.where(same, self.intra_node_bw, self.inter_node_bw).astype(float)
        np.fill_diagonal(bw, np.inf)
        return bw

    def slots_per_gpu(self, num_experts: int, replicas: int = 0) -> int:
        """Expert slots per GPU per layer: ceil(E / G) + replicas, checked against the memory cap."""
        if replicas < 0:
            raise TopologyError(f"replicas must be >= 0, got {replicas}")
        slots = math.ceil(num_experts / self.num_gpus) + replicas
        if self.max_slots_per_gpu is not None and slots > self.max_slots_per_gpu:
            raise TopologyError(
                f"topology {self.name}: {slots} expert slots per GPU needed "
                f"(ceil({num_experts}/{self.num_gpus}) + replicas={replicas}) but max_slots_per_gpu="
                f"{self.max_slots_per_gpu}; use fewer replicas or a topology with more GPUs")
        return slots

    def check_fits(self, num_experts: int) -> None:
        """Raise TopologyError if the GPUs cannot hold every expert of a layer."""
        if self.max_slots_per_gpu is not None and self.max_slots_per_gpu * self.num_gpus < num_experts:
            raise TopologyError(
                f"topology {self.name}: {self.num_gpus} GPUs x max_slots_per_gpu="
                f"{self.max_slots_per_gpu} slots cannot hold {num_experts} experts per layer; "
                f"raise max_slots_per_gpu or add GPUs")


GB = 1e9


def topology_preset(name: str) -> dict[str, Any]:
    """The preset `conf/topology/<name>.yaml` as a plain dict (GB/s, us, TFLOP/s units)."""
    return conf_preset("topology", name, TopologyError)


def topology_from_config(cfg: Mapping[str, Any]) -> Topology:
    """Build and validate a Topology from a `topology/` config (bandwidths in GB/s, latency in us)."""
    name = str(cfg.get("name", "custom"))
    nodes, gpn = int(cfg["nodes"]), int(cfg["gpus_per_node"])
    if nodes < 1 or gpn < 1:
        raise TopologyError(f"topology {name}: nodes={nodes} and gpus_per_node={gpn} must both be >= 1")
    for key in ("intra_node_bw_GBps", "inter_node_bw_GBps", "gpu_peak_tflops", "hbm_bw_GBps"):
        if float(cfg[key]) <= 0:
            raise TopologyError(f"topology {name}: {key} must be positive, got {cfg[key]}")
    matrix = cfg.get("bandwidth_matrix_GBps")
    bw = None
    if matrix is not None:
        bw = np.asarray(matrix, dtype=float) * GB
        g = nodes * gpn
        if bw.ndim != 2 or bw.shape[0] != bw.shape[1]:
            raise TopologyError(f"topology {name}: bandwidth_matrix_GBps must be square, got shape {bw.shape}")
        if bw.shape[0] != g:
            raise TopologyError(f"topology {name}: bandwidth_matrix_GBps is {bw.shape[0]}x{bw.shape[1]} "
                                f"but the topology has {g} GPUs")
        off = bw[~np.eye(g, dtype=bool)]
        if (off <= 0).any():
            raise TopologyError(f"topology {name}: bandwidth_matrix_GBps needs positive off-diagonal entries")
    slots = cfg.get("max_slots_per_gpu")
    if slots is not None and int(slots) < 1:
        raise TopologyError(f"topology {name}: max_slots_per_gpu must be >= 1 or null, got {slots}")
    return Topology(
        name=name, nodes=nodes, gpus_per_node=gpn,
        intra_node_bw=float(cfg["intra_node_bw_GBps"]) * GB,
        inter_node_bw=float(cfg["inter_node_bw_GBps"]) * GB,
        intra_node_latency=float(cfg.get("intra_node_latency_us", 0.0)) * 1e-6,
        inter_node_latency=float(cfg.get("inter_node_latency_us", 0.0)) * 1e-6,
        gpu_peak_flops=float(cfg["gpu_peak_tflops"]) * 1e12,
        hbm_bw=float(cfg["hbm_bw_GBps"]) * GB,
        max_slots_per_gpu=None if slots is None else int(slots),
        bandwidth_matrix=bw,
        calibration=dict(cfg.get("calibration") or {}),
    )
