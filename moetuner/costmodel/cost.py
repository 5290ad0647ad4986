"""Cost constants of expert-parallel serving: expert time f(n) and the links (docs/formulation.md section 3).

- compute: roofline f(n) = max(n * 6*h*i / peak_flops, 3*h*i*2 / hbm_bw), or the calibrated
  f(n) = expert_fixed_s + expert_per_token_s * n (a topology's `calibration` block).
- communication: one copy of a token is h * 2 bytes (bf16). An all-to-all phase costs max over GPUs
  of max(send, receive), where send = sum over peers of bytes / link bandwidth + the largest latency
  among the peers it sends to (messages leave concurrently, links are full duplex); receive likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.topology import GB, Topology

BYTES_PER_VALUE = 2  # bf16 activations and weights
CALIBRATION_KEYS = ("expert_fixed_s", "expert_per_token_s", "intra_node_bw_GBps", "inter_node_bw_GBps",
                    "intra_node_latency_us", "inter_node_latency_us")


class SimulationError(ValueError):
    """Inputs of a simulation disagree; the message names the problem and the fix."""


@dataclass(frozen=True)
class CostModel:
    """Expert time f(n) = max(n * per_token_s, floor_s) + fixed_s for n > 0, and the links."""

    per_token_s: float
    floor_s: float
    fixed_s: float
    token_bytes: float
    bandwidth: np.ndarray  # [G, G] B/s, inf on the diagonal
    latency: np.ndarray  # [G, G] s, 0 on the diagonal
    node: np.ndarray  # [G] node of each GPU

    @property
    def num_gpus(self) -> int:
        return len(self.node)

    @property
    def gpus_per_node(self) -> int:
        return int((self.node == self.node[0]).sum())

    def expert_time(self, tokens: np.ndarray) -> np.ndarray:
        """Seconds an expert slot needs for `tokens` tokens (0 when idle). [...] -> [...]"""
        busy = np.maximum(tokens * self.per_token_s, self.floor_s) + self.fixed_s
        return np.where(tokens > 0, busy, 0.0)


def cost_model(topology: Topology, hidden_size: int, intermediate_size: int) -> CostModel:
    """Roofline (or calibrated) expert cost and link matrices of `topology` for one expert shape."""
    cal = topology.calibration
    unknown = sorted(set(cal) - set(CALIBRATION_KEYS))
    if unknown:
        raise SimulationError(f"topology {topology.name}: unknown calibration key(s) {unknown}; "
                              f"known keys: {list(CALIBRATION_KEYS)}")
    if ("expert_fixed_s" in cal) != ("expert_per_token_s" in cal):
        raise SimulationError(f"topology {topology.name}: calibration needs both expert_fixed_s and "
                              f"expert_per_token_s (or neither, for the roofline)")
    node = np.arange(topology.num_gpus) // topology.gpus_per_node
    same = node[:, None] == node[None, :]
    bandwidth = topology.bandwidth()
    if "intra_node_bw_GBps" in cal or "inter_node_bw_GBps" in cal:
        intra = float(cal["intra_node_bw_GBps"]) * GB if "intra_node_bw_GBps" in cal else topology.intra_node_bw
        inter = float(cal["inter_node_bw_GBps"]) * GB if "inter_node_bw_GBps" in cal else topology.inter_node_bw
        bandwidth = np.where(same, intra, inter)
        np.fill_diagonal(bandwidth, np.inf)
    intra_lat = float(cal["intra_node_latency_us"]) * 1e-6 if "intra_node_latency_us" in cal \
        else topology.intra_node_latency
    inter_lat = float(cal["inter_node_latency_us"]) * 1e-6 if "inter_node_latency_us" in cal \
        else topology.inter_node_latency
    latency = np.where(same, intra_lat, inter_lat)
    np.fill_diagonal(latency, 0.0)
    shape = hidden_size * intermediate_size
    if "expert_fixed_s" in cal:
        per_token, floor, fixed = float(cal["expert_per_token_s"]), 0.0, float(cal["expert_fixed_s"])
    else:
        per_token = 6.0 * shape / topology.gpu_peak_flops
        floor, fixed = 3.0 * shape * BYTES_PER_VALUE / topology.hbm_bw, 0.0
    return CostModel(per_token, floor, fixed, float(hidden_size * BYTES_PER_VALUE), bandwidth, latency, node)


def a2a_time(copies: np.ndarray, cost: CostModel) -> float:
    """Seconds of one all-to-all phase: max over GPUs of max(send, receive). copies [G, G] (src, dst)"""
    seconds = copies * cost.token_bytes / cost.bandwidth  # diagonal is 0 / inf = 0
    lat = np.where(copies > 0, cost.latency, 0.0)
    send = seconds.sum(1) + lat.max(1)
    receive = seconds.sum(0) + lat.max(0)
    return float(np.maximum(send, receive).max())


def copy_matrix(src: np.ndarray, dst_mask: np.ndarray) -> np.ndarray:
    """Token copies from src[t] to every GPU in dst_mask[t] except src[t]. src [B], dst_mask [B, G] -> [G, G]"""
    num_gpus = dst_mask.shape[1]
    mask = dst_mask.copy()
    mask[np.arange(len(src)), src] = False
    tok, dst = np.nonzero(mask)
    return np.bincount(src[tok] * num_gpus + dst, minlength=num_gpus * num_gpus).reshape(num_gpus, num_gpus)
