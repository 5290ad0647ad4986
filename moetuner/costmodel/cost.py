"""Cost constants of expert-parallel serving: expert time f(n) and the links (docs/formulation.md section 3).

- compute, one of EXPERT_MODELS (a topology's `calibration.expert_model`; default: `calibrated_linear`
  when the block has expert_fixed_s, else `roofline`):
  - `roofline`: f(n) = max(n * 6*h*i / peak_flops, 3*h*i*2 / hbm_bw) (vendor peaks, bf16).
  - `calibrated_linear`: f(n) = expert_fixed_s + expert_per_token_s * n (fitted on served steps).
  - `efficiency`: an expert is two grouped GEMMs, gate+up (M=n, N=2i, K=h) and down (M=n, N=h, K=i);
    each costs the smooth roofline ((flops/P)^q + (bytes/W)^q)^(1/q) (GemmCurve), and a GPU that
    serves any token pays each GEMM's K-loop latency k_latency_s * K once (one grouped kernel).
    The constants are fitted on DeepGEMM's published tables (moetuner.hardware.fit).
    Tile form (a block with `gemm_tile_us`, costmodel/tiles.py TILE_KEYS): each GEMM costs its output tiles'
    share of the SMs against its HBM bytes (TileGemm.slot_time), and a busy GPU pays gemm_kernel_us per GEMM.
- communication: one copy of a token is `scatter_bytes` on the way out and `combine_bytes` on the way
  back (default h * 2, bf16 both ways). An all-to-all phase costs max over GPUs of max(send, receive),
  where send = the transfer seconds + the largest latency among the peers it sends to (messages leave
  concurrently, links are full duplex) + message_s per peer; receive likewise. Transfer seconds per
  LINK_MODELS: `serial` sums bytes / bandwidth over all peers (one port); `concurrent` takes the larger
  of the intra-node and the inter-node sums (NVLink and RDMA ports work in parallel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.costmodel.settings import EXPERT_MODELS, LINK_MODELS, check_choice
from moetuner.costmodel.tiles import TILE_KEYS, TileGemm, tile_gemm
from moetuner.topology import GB, Topology

BYTES_PER_VALUE = 2  # bf16 activations and weights
SCALE_BYTES = 4  # one float32 scale per block of an FP8 tensor
CALIBRATION_KEYS = ("expert_fixed_s", "expert_per_token_s", "intra_node_bw_GBps", "inter_node_bw_GBps",
                    "intra_node_latency_us", "inter_node_latency_us", "expert_model", "gemm_peak_tflops",
                    "gemm_mem_bw_GBps", "gemm_overlap_q", "gemm_k_latency_ns", "gemm_act_bytes",
                    "gemm_weight_bytes", "gemm_out_bytes", "link_model", "message_us",
                    "scatter_bytes_per_value", "scatter_scale_block", "combine_bytes_per_value", "gemm_sm_tflops",
                    "gemm_sm_load_GBps", "gemm_tile_us", "gemm_kernel_us", "gemm_num_sms")
GEMM_KEYS = ("gemm_peak_tflops", "gemm_mem_bw_GBps", "gemm_overlap_q", "gemm_k_latency_ns")


class SimulationError(ValueError):
    """Inputs of a simulation disagree; the message names the problem and the fix."""


@dataclass(frozen=True)
class GemmCurve:
    """Achieved time of a GEMM [M, K] x [K, N]: ((2MNK / peak_flops)^q + (bytes / mem_bw)^q)^(1/q), bytes =
    M*K*act + N*K*weight + M*N*out; q = 1 adds compute and memory time, q -> inf is the roofline's max.
    The K-loop latency k_latency_s * K is paid once per kernel (kernel_s)."""

    peak_flops: float  # FLOP/s
    mem_bw: float  # B/s
    overlap_q: float
    k_latency_s: float  # seconds per unit of K
    act_bytes: float = 1.0  # FP8 activations
    weight_bytes: float = 1.0  # FP8 weights
    out_bytes: float = 2.0  # BF16 output

    def time(self, m: np.ndarray, n: int, k: int) -> np.ndarray:
        """Seconds of the GEMM body (no kernel latency) for M = m rows. [...] -> [...]"""
        m = np.asarray(m, dtype=float)
        compute = 2.0 * m * n * k / self.peak_flops
        memory = (m * k * self.act_bytes + n * k * self.weight_bytes + m * n * self.out_bytes) / self.mem_bw
        q = self.overlap_q
        return (compute ** q + memory ** q) ** (1.0 / q)

    def kernel_s(self, k: int) -> float:
        """Fixed seconds of one (grouped) GEMM kernel of depth K."""
        return self.k_latency_s * k


def expert_gemms(hidden_size: int, intermediate_size: int) -> tuple[tuple[int, int], ...]:
    """(N, K) of an expert's GEMMs: fused gate+up [h -> 2i], then down [i -> h]."""
    return ((2 * intermediate_size, hidden_size), (hidden_size, intermediate_size))


@dataclass(frozen=True)
class CostModel:
    """Expert time f(n) = max(n * per_token_s, floor_s) + fixed_s for n > 0 (or the GEMM curve), and the links.

    With `gemm` set, f(n) = sum over `gemms` (N, K) of gemm.time(n, N, K), per_token_s is its large-n
    slope (the linear proxy lp_comm uses) and a busy GPU adds kernel_s once per layer."""

    per_token_s: float
    floor_s: float
    fixed_s: float
    token_bytes: float
    bandwidth: np.ndarray  # [G, G] B/s, inf on the diagonal
    latency: np.ndarray  # [G, G] s, 0 on the diagonal
    node: np.ndarray  # [G] node of each GPU
    gemm: GemmCurve | None = None
    gemms: tuple[tuple[int, int], ...] = ()
    kernel_s: float = 0.0  # seconds per busy GPU per layer
    scatter_bytes: float | None = None  # bytes of one token copy on the way out (None: token_bytes)
    combine_bytes: float | None = None  # on the way back (None: token_bytes)
    message_s: float = 0.0  # seconds per peer a GPU sends to (receives from) in a phase
    link_model: str = "serial"
    tiles: TileGemm | None = None  # the efficiency model's tile form (then gemm is None)

    @property
    def num_gpus(self) -> int:
        return len(self.node)

    @property
    def gpus_per_node(self) -> int:
        return int((self.node == self.node[0]).sum())

    @property
    def phase_bytes(self) -> tuple[float, float]:
        """(scatter, combine) bytes of one token copy."""
        return (self.token_bytes if self.scatter_bytes is None else self.scatter_bytes,
                self.token_bytes if self.combine_bytes is None else self.combine_bytes)

    def expert_time(self, tokens: np.ndarray) -> np.ndarray:
        """Seconds an expert slot needs for `tokens` tokens (0 when idle). [...] -> [...]"""
        if self.tiles is not None:
            busy = sum(self.tiles.slot_time(tokens, n, k) for n, k in self.gemms)
        elif self.gemm is not None:
            busy = sum(self.gemm.time(tokens, n, k) for n, k in self.gemms)
        else:
            busy = np.maximum(tokens * self.per_token_s, self.floor_s) + self.fixed_s
        return np.where(tokens > 0, busy, 0.0)

    def gpu_compute(self, per_slot: np.ndarray) -> np.ndarray:
        """Seconds each GPU computes one layer: its slots' expert times + kernel_s if any is busy.
        per_slot [..., G * S] tokens of each slot (GPU-major) -> [..., G]"""
        lead = per_slot.shape[:-1]
        slots = per_slot.reshape(*lead, self.num_gpus, -1)
        compute = self.expert_time(per_slot).reshape(*lead, self.num_gpus, -1).sum(-1)
        return compute + np.where(slots.sum(-1) > 0, self.kernel_s, 0.0) if self.kernel_s else compute


def _calibrated(cal: dict, key: str, default: float, scale: float) -> float:
    return float(cal[key]) * scale if key in cal else default


def expert_model(topology: Topology) -> str:
    """The topology's expert model: `calibration.expert_model`, else calibrated_linear if the block has
    expert_fixed_s, else roofline."""
    cal = topology.calibration
    default = "calibrated_linear" if "expert_fixed_s" in cal else "roofline"
    return check_choice("calibration.expert_model", cal.get("expert_model", default), EXPERT_MODELS, SimulationError)


def check_calibration(topology: Topology) -> str:
    """Raise SimulationError naming the first bad key of `topology.calibration`; return its expert model."""
    cal = topology.calibration
    unknown = sorted(set(cal) - set(CALIBRATION_KEYS))
    if unknown:
        raise SimulationError(f"topology {topology.name}: unknown calibration key(s) {unknown}; "
                              f"known keys: {list(CALIBRATION_KEYS)}")
    if ("expert_fixed_s" in cal) != ("expert_per_token_s" in cal):
        raise SimulationError(f"topology {topology.name}: calibration needs both expert_fixed_s and "
                              f"expert_per_token_s (or neither, for the roofline)")
    model = expert_model(topology)
    check_choice("calibration.link_model", cal.get("link_model", "serial"), LINK_MODELS, SimulationError)
    if model == "calibrated_linear" and "expert_fixed_s" not in cal:
        raise SimulationError(f"topology {topology.name}: expert_model=calibrated_linear needs expert_fixed_s "
                              f"and expert_per_token_s in its calibration")
    if model != "calibrated_linear" and ("expert_fixed_s" in cal or "expert_per_token_s" in cal):
        raise SimulationError(f"topology {topology.name}: expert_fixed_s/expert_per_token_s belong to "
                              f"expert_model=calibrated_linear, not {model}; drop them or change the model")
    missing = [k for k in (TILE_KEYS if "gemm_tile_us" in cal else GEMM_KEYS) if k not in cal]
    if model == "efficiency" and missing:
        raise SimulationError(f"topology {topology.name}: expert_model=efficiency needs {missing} in its "
                              f"calibration (fit them with moetuner-fit-hardware)")
    return model


def gemm_curve(cal: dict) -> GemmCurve:
    """The GemmCurve of a calibration block (GEMM_KEYS, optional gemm_*_bytes)."""
    return GemmCurve(peak_flops=float(cal["gemm_peak_tflops"]) * 1e12, mem_bw=float(cal["gemm_mem_bw_GBps"]) * GB,
                     overlap_q=float(cal["gemm_overlap_q"]), k_latency_s=float(cal["gemm_k_latency_ns"]) * 1e-9,
                     act_bytes=float(cal.get("gemm_act_bytes", 1.0)),
                     weight_bytes=float(cal.get("gemm_weight_bytes", 1.0)),
                     out_bytes=float(cal.get("gemm_out_bytes", 2.0)))


def phase_token_bytes(cal: dict, hidden_size: int) -> tuple[float | None, float | None]:
    """(scatter, combine) bytes of one token copy from the calibration block (None: bf16 default).
    FP8 scatter: h * 1 + ceil(h / scatter_scale_block) * 4 scale bytes."""
    scatter = combine = None
    if "scatter_bytes_per_value" in cal:
        block = cal.get("scatter_scale_block")
        scales = 0 if block is None else -(-hidden_size // int(block)) * SCALE_BYTES
        scatter = float(cal["scatter_bytes_per_value"]) * hidden_size + scales
    if "combine_bytes_per_value" in cal:
        combine = float(cal["combine_bytes_per_value"]) * hidden_size
    return scatter, combine


def cost_model(topology: Topology, hidden_size: int, intermediate_size: int) -> CostModel:
    """Expert cost (the topology's expert_model) and link matrices of `topology` for one expert shape."""
    cal = topology.calibration
    model = check_calibration(topology)
    node = np.arange(topology.num_gpus) // topology.gpus_per_node
    same = node[:, None] == node[None, :]
    bandwidth = topology.bandwidth()
    if "intra_node_bw_GBps" in cal or "inter_node_bw_GBps" in cal:
        intra = _calibrated(cal, "intra_node_bw_GBps", topology.intra_node_bw, GB)
        inter = _calibrated(cal, "inter_node_bw_GBps", topology.inter_node_bw, GB)
        bandwidth = np.where(same, intra, inter)
        np.fill_diagonal(bandwidth, np.inf)
    intra_lat = _calibrated(cal, "intra_node_latency_us", topology.intra_node_latency, 1e-6)
    inter_lat = _calibrated(cal, "inter_node_latency_us", topology.inter_node_latency, 1e-6)
    latency = np.where(same, intra_lat, inter_lat)
    np.fill_diagonal(latency, 0.0)
    shape = hidden_size * intermediate_size
    gemm, gemms, kernel, tiles = None, (), 0.0, None
    if model == "calibrated_linear":
        per_token, floor, fixed = float(cal["expert_per_token_s"]), 0.0, float(cal["expert_fixed_s"])
    elif model == "roofline":
        per_token = 6.0 * shape / topology.gpu_peak_flops
        floor, fixed = 3.0 * shape * BYTES_PER_VALUE / topology.hbm_bw, 0.0
    elif "gemm_tile_us" in cal:
        tiles, gemms = tile_gemm(cal), expert_gemms(hidden_size, intermediate_size)
        per_token = sum(2.0 * n * k for n, k in gemms) / (tiles.sm_flops * tiles.num_sms)
        floor, fixed, kernel = 0.0, 0.0, tiles.kernel_s * len(gemms)
    else:
        gemm, gemms = gemm_curve(cal), expert_gemms(hidden_size, intermediate_size)
        per_token, floor, fixed = sum(2.0 * n * k for n, k in gemms) / gemm.peak_flops, 0.0, 0.0
        kernel = sum(gemm.kernel_s(k) for _, k in gemms)
    scatter, combine = phase_token_bytes(cal, hidden_size)
    return CostModel(per_token, floor, fixed, float(hidden_size * BYTES_PER_VALUE), bandwidth, latency, node,
                     gemm=gemm, gemms=gemms, kernel_s=kernel, scatter_bytes=scatter, combine_bytes=combine,
                     message_s=float(cal.get("message_us", 0.0)) * 1e-6, link_model=str(cal.get("link_model", "serial")),
                     tiles=tiles)


def a2a_time(copies: np.ndarray, cost: CostModel, token_bytes: float | None = None) -> np.ndarray | float:
    """Seconds of all-to-all phases: per phase, max over GPUs of max(send, receive). copies [..., G, G]
    (src, dst) -> [...] (a float for one phase [G, G]); token_bytes: bytes of one copy (None: cost.token_bytes)."""
    seconds = copies * (cost.token_bytes if token_bytes is None else token_bytes) / cost.bandwidth  # diag 0
    lat = np.where(copies > 0, cost.latency, 0.0)
    if cost.link_model == "concurrent":
        cross = cost.node[:, None] != cost.node[None, :]
        inside, across = np.where(cross, 0.0, seconds), np.where(cross, seconds, 0.0)
        send = np.maximum(inside.sum(-1), across.sum(-1)) + lat.max(-1)
        receive = np.maximum(inside.sum(-2), across.sum(-2)) + lat.max(-2)
    else:
        send = seconds.sum(-1) + lat.max(-1)
        receive = seconds.sum(-2) + lat.max(-2)
    if cost.message_s:
        peers = (copies > 0) & ~np.eye(copies.shape[-1], dtype=bool)
        send, receive = send + cost.message_s * peers.sum(-1), receive + cost.message_s * peers.sum(-2)
    worst = np.maximum(send, receive).max(-1)
    return float(worst) if copies.ndim == 2 else worst


def source_totals(src: np.ndarray, per_token: np.ndarray, num_gpus: int) -> np.ndarray:
    """Sum of per_token over the tokens of each source GPU (one bincount over (batch, GPU, column) cells;
    exact for counts; no BLAS, so its time does not depend on BLAS threads fighting over shared cores).
    src [..., B], per_token [..., B, N] counts -> [..., G, N] int64"""
    lead, tokens, cols = src.shape[:-1], src.shape[-1], per_token.shape[-1]
    batch = int(np.prod(lead, dtype=np.int64))
    cell = (np.arange(batch)[:, None] * num_gpus + src.reshape(batch, tokens)).reshape(-1, 1) * cols + np.arange(cols)
    sums = np.bincount(cell.ravel(), weights=per_token.reshape(-1).astype(np.float64), minlength=batch * num_gpus * cols)
    return sums.astype(np.int64).reshape(*lead, num_gpus, cols)


def off_diagonal(copies: np.ndarray) -> np.ndarray:
    """copies [..., G, G] with its diagonal (copies to the GPU a token is on) zeroed, in place."""
    num_gpus = copies.shape[-1]
    copies[..., np.arange(num_gpus), np.arange(num_gpus)] = 0
    return copies


def copy_matrix(src: np.ndarray, dst_mask: np.ndarray) -> np.ndarray:
    """Token copies from src[t] to every GPU in dst_mask[t] except src[t].
    src [..., B], dst_mask [..., B, G] -> [..., G, G] (src, dst)"""
    return off_diagonal(source_totals(src, dst_mask, dst_mask.shape[-1]))


def needed_gpus(dest: np.ndarray, num_gpus: int) -> np.ndarray:
    """The GPUs each token's pairs go to, each once (the per-GPU dedup of every dataflow but low_latency).
    dest [..., B, k] GPU of each pair -> [..., B, G] bool"""
    on = np.zeros((*dest.shape[:-1], num_gpus), dtype=bool)
    np.put_along_axis(on, dest, True, axis=-1)
    return on


def pair_copy_matrix(src: np.ndarray, dest: np.ndarray, num_gpus: int) -> np.ndarray:
    """One copy per token-expert pair (low_latency: no dedup per GPU), none to the token's own GPU: one
    bincount over the (batch, source, destination) cell of every pair, O(B k), not O(B G).
    src [..., B], dest [..., B, k] GPU of each pair -> [..., G, G] (src, dst) int64"""
    lead, tokens = src.shape[:-1], src.shape[-1]
    batch = int(np.prod(lead, dtype=np.int64))
    rows = np.arange(batch, dtype=np.int64)[:, None, None] * num_gpus + src.reshape(batch, tokens, 1)
    cell = rows * num_gpus + dest.reshape(batch, tokens, -1)
    counts = np.bincount(cell.ravel(), minlength=batch * num_gpus * num_gpus)
    return off_diagonal(counts.reshape(*lead, num_gpus, num_gpus))


def relay_copies(src: np.ndarray, on: np.ndarray, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical scatter copies: (inter-node phase, intra-node phase), each [..., G, G] (src, dst).

    A token on GPU g (local rank g mod n) that needs GPUs on another node b sends one copy to the
    relay b * n + g mod n, which forwards it to b's other GPUs it needs; own-node GPUs get it directly.
    src [..., B], on [..., B, G] bool the GPUs each token needs."""
    num_gpus, per_node = cost.num_gpus, cost.gpus_per_node
    gpu = np.arange(num_gpus)
    need = copy_matrix(src, on)  # [..., G, G] tokens of each source that need each GPU
    node_need = on.reshape(*on.shape[:-1], num_gpus // per_node, per_node).any(-1)  # [..., B, nodes]
    per_node_need = source_totals(src, node_need, num_gpus)  # [..., G, nodes] one copy per (token, node)
    inter = np.zeros_like(need)
    for node in range(num_gpus // per_node):
        away = gpu[cost.node != node]
        inter[..., away, node * per_node + away % per_node] = per_node_need[..., away, node]
    same = cost.node[:, None] == cost.node[None, :]
    relay = cost.node[None, :] * per_node + gpu[:, None] % per_node  # [G, G] relay of (source, destination)
    forward = ~same & (relay != gpu[None, :])
    intra = need * same
    source, dest = np.nonzero(forward)
    np.add.at(np.moveaxis(intra, (-2, -1), (0, 1)), (relay[source, dest], dest),
              np.moveaxis(need, (-2, -1), (0, 1))[source, dest])
    return inter, intra


def phases(first: np.ndarray | float, second: np.ndarray | float, cost: CostModel) -> np.ndarray | float:
    """Seconds of two phases of one direction of hierarchical: their sum, or pipelined (concurrent links). [...]"""
    return np.maximum(first, second) if cost.link_model == "concurrent" else first + second
