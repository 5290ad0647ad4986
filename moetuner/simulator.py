"""Per-step cost model of expert-parallel MoE serving (formulation.md section 3).

A trace's tokens are cut into steps of `step_tokens` consecutive tokens (a trailing partial step is
left out). Token j of a step lives on home GPU j % G (attention is data parallel). In every MoE layer
each token-expert pair is served by one replica of the expert (the replica policy picks it), then:

- compute: a GPU's time is the sum over its active slots of f(n), n the tokens the slot got;
  roofline f(n) = max(n * 6*h*i / peak_flops, 3*h*i*2 / hbm_bw), or the calibrated
  f(n) = expert_fixed_s + expert_per_token_s * n; the layer pays the slowest GPU (the compute tail).
- communication, one copy of a token (h * 2 bytes, bf16) per distinct destination GPU, none to the
  GPU the token is on. An all-to-all phase costs max over GPUs of max(send, receive), where send =
  sum over peers of bytes / link bandwidth + the largest latency among the peers it sends to
  (messages leave concurrently, links are full duplex); receive likewise.
  - `dispatch_combine`: dispatch from home to the token's expert GPUs, combine the same copies back.
  - `expert_to_expert`: layer 0 dispatches from home; the combine gathers the k partial results on
    the GPU of the token's primary expert (largest gate weight, else the first listed), which is
    where the next layer dispatches from; the last layer combines back to home.
- layer time = dispatch + compute tail + combine; step time = sum over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from moetuner.placement.layout import logical_replica_count, logical_to_physical_map, validate_phy2log
from moetuner.topology import GB, Topology

DATAFLOWS = ("dispatch_combine", "expert_to_expert")
REPLICA_POLICIES = ("round_robin", "local_first", "balanced")
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


@dataclass(frozen=True)
class LayerSlots:
    """One layer of a placement, indexed for routing."""

    log2phy: np.ndarray  # [E, R] slots of each expert, -1 padded
    count: np.ndarray  # [E] replicas per expert
    gpu_of_slot: np.ndarray  # [P]

    @property
    def num_slots(self) -> int:
        return len(self.gpu_of_slot)


def layer_slots(phy2log: np.ndarray, num_gpus: int, num_experts: int) -> list[LayerSlots]:
    """Per-layer routing tables of a [L, P] placement."""
    log2phy = logical_to_physical_map(phy2log, num_experts)
    count = logical_replica_count(phy2log, num_experts)
    gpu_of_slot = np.arange(phy2log.shape[1]) // (phy2log.shape[1] // num_gpus)
    return [LayerSlots(log2phy[layer], count[layer], gpu_of_slot) for layer in range(phy2log.shape[0])]


def pick_round_robin(ids: np.ndarray, token: np.ndarray, slots: LayerSlots) -> np.ndarray:
    """Token t takes replica t mod count. ids [B, k], token [B] -> slot [B, k]"""
    rank = token[:, None] % np.maximum(slots.count[ids], 1)
    return slots.log2phy[ids, rank]


def pick_local_first(ids: np.ndarray, token: np.ndarray, src: np.ndarray, slots: LayerSlots,
                     node: np.ndarray) -> np.ndarray:
    """A replica on the token's GPU, else on its node, else any; ties round robin by token. -> [B, k]"""
    cand = slots.log2phy[ids]  # [B, k, R]
    gpu = slots.gpu_of_slot[np.maximum(cand, 0)]
    here = src[:, None, None]
    prio = np.where(cand < 0, 3, np.where(gpu == here, 0, np.where(node[gpu] == node[here], 1, 2)))
    best = prio == prio.min(-1, keepdims=True)
    pick = token[:, None] % best.sum(-1)
    rank = np.cumsum(best, -1) - 1
    chosen = np.argmax(best & (rank == pick[..., None]), -1)
    return np.take_along_axis(cand, chosen[..., None], -1)[..., 0]


def water_fill(level: np.ndarray, tokens: int) -> np.ndarray:
    """Integer split of `tokens` over bins at `level` that minimises the highest level. [r] -> int [r]"""
    order = np.sort(level)
    for j in range(1, len(order) + 1):
        top = (tokens + order[:j].sum()) / j
        if j == len(order) or top <= order[j]:
            break
    share = np.maximum(top - level, 0.0)
    quota = np.floor(share).astype(np.int64)
    extra = tokens - int(quota.sum())
    quota[np.argsort(-(share - quota), kind="stable")[:extra]] += 1
    return quota


def pick_balanced(ids: np.ndarray, src: np.ndarray, slots: LayerSlots, num_gpus: int) -> np.ndarray:
    """Unreplicated experts fixed; replicated ones, hottest first, water-fill their replicas' GPUs
    (tokens per GPU); tokens sorted by source GPU fill replicas sorted by GPU. -> [B, k]"""
    chosen = slots.log2phy[ids, 0].copy()
    single = slots.count[ids] == 1
    gpu_load = np.bincount(slots.gpu_of_slot[chosen[single]], minlength=num_gpus).astype(float)
    flat_ids = ids.ravel()
    pair_src = np.repeat(src, ids.shape[1])
    order = np.lexsort((pair_src, flat_ids))  # pairs grouped by expert, then by source GPU
    load = np.bincount(flat_ids, minlength=len(slots.count))
    start = np.concatenate([[0], np.cumsum(load)])
    flat_chosen = chosen.ravel()
    for expert in np.argsort(-load, kind="stable"):
        if slots.count[expert] < 2 or load[expert] == 0:
            continue
        reps = slots.log2phy[expert, :slots.count[expert]]
        reps = reps[np.argsort(slots.gpu_of_slot[reps], kind="stable")]
        gpus = slots.gpu_of_slot[reps]
        quota = water_fill(gpu_load[gpus], int(load[expert]))
        flat_chosen[order[start[expert]:start[expert + 1]]] = np.repeat(reps, quota)
        np.add.at(gpu_load, gpus, quota)
    return flat_chosen.reshape(ids.shape)


def choose_slots(ids: np.ndarray, token: np.ndarray, src: np.ndarray, slots: LayerSlots,
                 policy: str, cost: CostModel) -> np.ndarray:
    """The physical slot serving each token-expert pair under `policy`. ids [B, k] -> [B, k]"""
    if policy == "round_robin":
        return pick_round_robin(ids, token, slots)
    if policy == "local_first":
        return pick_local_first(ids, token, src, slots, cost.node)
    assert policy == "balanced", f"unknown replica policy {policy}"
    return pick_balanced(ids, src, slots, cost.num_gpus)


@dataclass(frozen=True)
class LayerStep:
    """One layer of one step."""

    dispatch_s: float
    combine_s: float
    compute_s: np.ndarray  # [G]
    tokens: np.ndarray  # [G] token-expert pairs served
    bytes_intra: float
    bytes_inter: float
    out_gpu: np.ndarray  # [B] where each token's activation is after the combine

    @property
    def time_s(self) -> float:
        return self.dispatch_s + float(self.compute_s.max()) + self.combine_s


def simulate_layer(ids: np.ndarray, token: np.ndarray, src: np.ndarray, primary: np.ndarray,
                   combine_to_home: np.ndarray | None, slots: LayerSlots, cost: CostModel,
                   policy: str) -> LayerStep:
    """One layer for B tokens at GPUs src [B] with experts ids [B, k].

    combine_to_home: [B] home GPUs to combine back to, or None to combine on the GPU of the
    primary expert (column primary [B] of ids).
    """
    num_gpus = cost.num_gpus
    slot = choose_slots(ids, token, src, slots, policy, cost)
    dest = slots.gpu_of_slot[slot]  # [B, k]
    on = np.zeros((len(src), num_gpus), dtype=bool)
    on[np.arange(len(src))[:, None], dest] = True
    dispatch = copy_matrix(src, on)
    target = combine_to_home if combine_to_home is not None else dest[np.arange(len(src)), primary]
    combine = copy_matrix(target, on).T
    per_slot = np.bincount(slot.ravel(), minlength=slots.num_slots)
    compute = cost.expert_time(per_slot).reshape(num_gpus, -1).sum(1)
    copies = dispatch + combine
    inter = cost.node[:, None] != cost.node[None, :]
    return LayerStep(dispatch_s=a2a_time(dispatch, cost), combine_s=a2a_time(combine, cost), compute_s=compute,
                     tokens=per_slot.reshape(num_gpus, -1).sum(1).astype(float),
                     bytes_intra=float(copies[~inter].sum() * cost.token_bytes),
                     bytes_inter=float(copies[inter].sum() * cost.token_bytes), out_gpu=target)


def primary_column(trace_ids: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Column of each token's primary expert: largest gate weight, else 0. [T, L, k] -> [T, L]"""
    if weights is None:
        return np.zeros(trace_ids.shape[:2], dtype=np.int64)
    return np.argmax(weights, axis=-1)


def simulate_step(ids: np.ndarray, primary: np.ndarray, slots: list[LayerSlots], cost: CostModel,
                  dataflow: str, policy: str) -> list[LayerStep]:
    """Every layer of one step; token j starts on home GPU j % G. ids [B, L, k], primary [B, L]"""
    assert dataflow in DATAFLOWS, f"unknown dataflow {dataflow}"
    num_tokens, num_layers = ids.shape[:2]
    token = np.arange(num_tokens)
    home = token % cost.num_gpus
    src, out = home, []
    for layer in range(num_layers):
        back = home if dataflow == "dispatch_combine" or layer == num_layers - 1 else None
        out.append(simulate_layer(ids[:, layer], token, src, primary[:, layer], back, slots[layer], cost, policy))
        src = out[-1].out_gpu
    return out


@dataclass(frozen=True)
class SimResult:
    """Per step s and layer l (and GPU g) of a simulation."""

    dispatch_s: np.ndarray  # [S, L]
    combine_s: np.ndarray  # [S, L]
    compute_s: np.ndarray  # [S, L, G]
    tokens: np.ndarray  # [S, L, G] token-expert pairs per GPU
    bytes_intra: np.ndarray  # [S, L]
    bytes_inter: np.ndarray  # [S, L]

    @property
    def compute_tail_s(self) -> np.ndarray:
        """[S, L]"""
        return self.compute_s.max(-1)

    @property
    def layer_time_s(self) -> np.ndarray:
        """dispatch + compute tail + combine. [S, L]"""
        return self.dispatch_s + self.compute_tail_s + self.combine_s

    @property
    def tail_ratio(self) -> np.ndarray:
        """max / mean tokens per GPU. [S, L]"""
        mean = self.tokens.mean(-1)
        return np.divide(self.tokens.max(-1), mean, out=np.ones_like(mean), where=mean > 0)

    def metrics(self) -> dict[str, float]:
        """Scalars: means over steps of per-step sums over layers (seconds, bytes), and ratios."""
        step_time = self.layer_time_s.sum(1)
        return {
            "layer_time_s": float(step_time.mean()),
            "layer_time_max_step_s": float(step_time.max()),
            "a2a_time_s": float((self.dispatch_s + self.combine_s).sum(1).mean()),
            "dispatch_time_s": float(self.dispatch_s.sum(1).mean()),
            "compute_time_s": float(self.compute_tail_s.sum(1).mean()),
            "compute_mean_s": float(self.compute_s.mean(-1).sum(1).mean()),
            "compute_tail_ratio": float(self.tail_ratio.mean()),
            "bytes_intra_per_step": float(self.bytes_intra.sum(1).mean()),
            "bytes_inter_per_step": float(self.bytes_inter.sum(1).mean()),
            "num_steps": int(step_time.shape[0]),
        }

    def per_layer(self) -> dict[str, np.ndarray]:
        """Columns of the per-layer table (means over steps). Each [L]"""
        return {
            "dispatch_s": self.dispatch_s.mean(0), "compute_tail_s": self.compute_tail_s.mean(0),
            "compute_mean_s": self.compute_s.mean(-1).mean(0), "combine_s": self.combine_s.mean(0),
            "layer_time_s": self.layer_time_s.mean(0), "tail_ratio": self.tail_ratio.mean(0),
            "bytes_intra": self.bytes_intra.mean(0), "bytes_inter": self.bytes_inter.mean(0),
        }


def check_inputs(phy2log: np.ndarray, num_gpus: int, ids: np.ndarray, num_experts: int, cost: CostModel,
                 step_tokens: int, dataflow: str, policy: str) -> None:
    """Raise SimulationError (PlacementError for the map itself) naming the first disagreement."""
    if dataflow not in DATAFLOWS:
        raise SimulationError(f"dataflow={dataflow!r} is unknown; choose one of {list(DATAFLOWS)}")
    if policy not in REPLICA_POLICIES:
        raise SimulationError(f"replica_policy={policy!r} is unknown; choose one of {list(REPLICA_POLICIES)}")
    if num_gpus != cost.num_gpus:
        raise SimulationError(f"the placement was solved for {num_gpus} GPUs but the topology has "
                              f"{cost.num_gpus}; simulate with the topology it was solved for")
    routed = np.zeros((ids.shape[1], num_experts), dtype=bool)
    routed[np.arange(ids.shape[1])[None, :, None], ids] = True
    validate_phy2log(phy2log, num_experts, num_gpus, required=routed)  # layers, ids, routed experts placed
    if not 1 <= step_tokens <= ids.shape[0]:
        raise SimulationError(f"step_tokens={step_tokens} but the trace has {ids.shape[0]} tokens; "
                              f"choose 1 <= step_tokens <= {ids.shape[0]}")


def simulate(phy2log: np.ndarray, num_gpus: int, ids: np.ndarray, primary: np.ndarray, num_experts: int,
             cost: CostModel, step_tokens: int, dataflow: str = "dispatch_combine",
             policy: str = "round_robin", progress: bool = False) -> SimResult:
    """Every full step of `step_tokens` consecutive tokens. phy2log [L, P], ids [T, L, k], primary [T, L]"""
    check_inputs(phy2log, num_gpus, ids, num_experts, cost, step_tokens, dataflow, policy)
    slots = layer_slots(phy2log, num_gpus, num_experts)
    steps = []
    for start in tqdm(range(0, ids.shape[0] - step_tokens + 1, step_tokens), desc="simulate",
                      unit="step", disable=not progress):
        window = slice(start, start + step_tokens)
        steps.append(simulate_step(ids[window].astype(np.int64), primary[window], slots, cost, dataflow, policy))
    field = lambda name: np.array([[getattr(layer, name) for layer in step] for step in steps])  # noqa: E731
    return SimResult(dispatch_s=field("dispatch_s"), combine_s=field("combine_s"), compute_s=field("compute_s"),
                     tokens=field("tokens"), bytes_intra=field("bytes_intra"), bytes_inter=field("bytes_inter"))
