"""Per-step cost model of expert-parallel MoE serving (formulation.md section 3).

A trace's tokens are cut into steps of `step_tokens` consecutive tokens (a trailing partial step is
left out). Token j of a step lives on home GPU j % G (attention is data parallel). In every MoE layer
each token-expert pair is served by one replica of the expert (the `dispatch` picks it, DISPATCHES:
`dynamic` even split, `static` nearest fixed replica, `lp` min busiest GPU, `lp_comm` min predicted
layer time), then:

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
  - `hierarchical` (DeepEP inter-node): home to experts and back like dispatch_combine, but a token
    crosses to another node once per destination node, to the relay GPU of its own local rank there;
    dispatch = inter-node phase (home -> relays) + intra-node phase (home -> own-node expert GPUs,
    relay -> its node's expert GPUs); the combine runs the two phases backwards (partial sums
    reduced on the relay).
- layer time = dispatch + compute tail + combine; step time = sum over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import highspy
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import maximum_flow
from tqdm import tqdm

from moetuner.placement.layout import (Placement, check_placement, logical_replica_count, logical_to_physical_map,
                                       routed_experts)
from moetuner.topology import GB, Topology

DATAFLOWS = ("dispatch_combine", "expert_to_expert", "hierarchical")
DISPATCHES = ("dynamic", "static", "lp", "lp_comm")
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


def pick_dynamic(ids: np.ndarray, token: np.ndarray, slots: LayerSlots) -> np.ndarray:
    """Even split: token t of the step takes replica t mod count. ids [B, k], token [B] -> slot [B, k]"""
    rank = token[:, None] % np.maximum(slots.count[ids], 1)
    return slots.log2phy[ids, rank]


def static_table(slots: LayerSlots, node: np.ndarray) -> np.ndarray:
    """Each source GPU's one fixed replica per expert: the nearest (own GPU, else own node, else any);
    among equally near replicas (in slot order) source GPU g takes number g mod their count. -> [G, E]"""
    num_gpus = len(node)
    cand = slots.log2phy  # [E, R]
    gpu = slots.gpu_of_slot[np.maximum(cand, 0)]  # [E, R]
    src = np.arange(num_gpus)[:, None, None]  # [G, 1, 1]
    prio = np.where(cand[None] < 0, 3, np.where(gpu[None] == src, 0, np.where(node[gpu][None] == node[src], 1, 2)))
    best = prio == prio.min(-1, keepdims=True)  # [G, E, R]
    pick = src[..., 0] % best.sum(-1)  # [G, E]
    rank = np.cumsum(best, -1) - 1
    chosen = np.argmax(best & (rank == pick[..., None]), -1)
    return np.take_along_axis(np.broadcast_to(cand, best.shape), chosen[..., None], -1)[..., 0]


def pick_static(ids: np.ndarray, src: np.ndarray, slots: LayerSlots, node: np.ndarray) -> np.ndarray:
    """SGLang `static`: the pair (token on GPU g, expert e) takes static_table[g, e]. -> [B, k]"""
    return static_table(slots, node)[src[:, None], ids]


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


@dataclass(frozen=True)
class SplitProblem:
    """The pairs of one layer-step whose expert has several replicas (the only ones a dispatch chooses).

    fixed: [B, k] slot of every pair with one replica, -1 for the choosable pairs;
    pair_token, pair_col: [M] the choosable pairs; pair_expert [M].
    """

    fixed: np.ndarray
    pair_token: np.ndarray
    pair_col: np.ndarray
    pair_expert: np.ndarray


def split_problem(ids: np.ndarray, slots: LayerSlots) -> SplitProblem:
    """Fix the pairs of unreplicated experts; list the rest. ids [B, k]"""
    multi = slots.count[ids] > 1
    fixed = np.where(multi, -1, slots.log2phy[ids, 0])
    tok, col = np.nonzero(multi)
    return SplitProblem(fixed, tok, col, ids[tok, col])


def fill_quotas(split: SplitProblem, slots: LayerSlots, quota: dict[int, np.ndarray], order_key: np.ndarray
                ) -> np.ndarray:
    """Give each replica of expert e quota[e][i] of e's pairs; pairs sorted by order_key [M] fill the
    replicas in slot order. -> slot [B, k]"""
    chosen = split.fixed.copy()
    order = np.lexsort((order_key, split.pair_expert))
    expert_sorted = split.pair_expert[order]
    bounds = np.searchsorted(expert_sorted, np.arange(len(slots.count) + 1))
    for e, q in quota.items():
        reps = slots.log2phy[e, :slots.count[e]]
        idx = order[bounds[e]:bounds[e + 1]]
        chosen[split.pair_token[idx], split.pair_col[idx]] = np.repeat(reps, q)
    return chosen


def pick_lp(ids: np.ndarray, src: np.ndarray, slots: LayerSlots, num_gpus: int) -> np.ndarray:
    """LPLB: the split of replicated experts' pairs that minimises the most pairs on one GPU (exact:
    the min-max transportation problem has an integral optimum; bisection on it with max-flow).
    Within an expert, pairs sorted by source GPU fill its replicas in GPU order. -> [B, k]"""
    split = split_problem(ids, slots)
    if not len(split.pair_token):
        return split.fixed
    fixed_load = np.bincount(slots.gpu_of_slot[split.fixed[split.fixed >= 0]], minlength=num_gpus)
    experts, need = np.unique(split.pair_expert, return_counts=True)
    flow = min_max_flow(experts, need, fixed_load, slots)  # [m, G]
    quota = {}
    for i, e in enumerate(experts):
        reps = slots.log2phy[e, :slots.count[e]]
        gpus = slots.gpu_of_slot[reps]
        q = np.zeros(len(reps), dtype=np.int64)
        for g in np.unique(gpus):  # several replicas on one GPU share its flow evenly
            here = np.flatnonzero(gpus == g)
            q[here] = water_fill(np.zeros(len(here)), int(flow[i, g]))
        quota[int(e)] = q
    return fill_quotas(split, slots, quota, src[split.pair_token])


def min_max_flow(experts: np.ndarray, need: np.ndarray, fixed_load: np.ndarray, slots: LayerSlots) -> np.ndarray:
    """Integer pairs of expert experts[i] per GPU, need [m] in all, only on GPUs holding a replica,
    minimising max over GPUs of fixed_load + flow. -> [m, G]"""
    num_gpus, m = len(fixed_load), len(experts)
    holds = np.zeros((m, num_gpus), dtype=bool)
    for i, e in enumerate(experts):
        holds[i, slots.gpu_of_slot[slots.log2phy[e, :slots.count[e]]]] = True
    e_idx, g_idx = np.nonzero(holds)
    n = m + num_gpus + 2  # source 0, experts 1..m, GPUs m+1..m+G, sink n-1
    heads = np.concatenate([np.zeros(m, int), 1 + e_idx, 1 + m + np.arange(num_gpus)])
    tails = np.concatenate([1 + np.arange(m), 1 + m + g_idx, np.full(num_gpus, n - 1)])
    graph = csr_matrix((np.arange(1, len(heads) + 1, dtype=np.int32), (heads, tails)), shape=(n, n))
    edge_of_entry = graph.data - 1  # the graph's structure is fixed; only the GPU capacities change
    total = int(need.sum())

    def max_flow(top: int):
        caps = np.concatenate([need, need[e_idx], np.maximum(top - fixed_load, 0)]).astype(np.int32)
        graph.data = caps[edge_of_entry]
        return maximum_flow(graph, 0, n - 1, method="dinic")

    level = fixed_load.astype(float)  # water-filling, hottest expert first: a feasible upper bound
    for i in np.argsort(-need, kind="stable"):
        gpus = np.flatnonzero(holds[i])
        level[gpus] += water_fill(level[gpus], int(need[i]))
    lo = max(int(fixed_load.max()), -(-(total + int(fixed_load.sum())) // num_gpus))
    hi = int(level.max())
    if lo < hi and max_flow(hi - 1).flow_value < total:  # the usual case: water-filling is optimal
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if max_flow(mid).flow_value == total:
            hi = mid
        else:
            lo = mid + 1
    flow = max_flow(lo).flow.toarray()
    return flow[1:m + 1, m + 1:m + 1 + num_gpus].astype(np.int64)


LP_COMM_EXACT_VARS = 64
"""pick_lp_comm solves its model exactly (MILP) up to this many variables, else rounds the LP relaxation."""


def pick_lp_comm(ids: np.ndarray, src: np.ndarray, slots: LayerSlots, cost: CostModel,
                 exact_vars: int = LP_COMM_EXACT_VARS) -> np.ndarray:
    """Ours: the split that minimises predicted layer time per_token * (most pairs on a GPU) + 2 * (the
    dispatch all-to-all, max over GPUs of send and receive seconds; the combine mirrors it).

    A pair's copy is free when the chosen replica's GPU is the token's own or one its unreplicated
    experts already need; pairs alike in (source GPU, expert, which replicas are free) form a class,
    and HiGHS splits every class over the expert's replicas: exactly (MILP) with up to `exact_vars`
    (class, replica) variables, else the LP relaxation with each class's fractional parts rounded
    (largest remainders first; a few tens of fractional variables per ESFT layer-step). Latencies
    and the dedup between two choosable pairs of one token are left out of the model. -> [B, k]"""
    split = split_problem(ids, slots)
    if not len(split.pair_token):
        return split.fixed
    num_gpus, num_tokens = cost.num_gpus, len(src)
    gpu_fixed = np.where(split.fixed >= 0, slots.gpu_of_slot[np.maximum(split.fixed, 0)], -1)
    visits = np.zeros((num_tokens, num_gpus), dtype=bool)
    rows, cols = np.nonzero(gpu_fixed >= 0)
    visits[rows, gpu_fixed[rows, cols]] = True
    fixed_copies = copy_matrix(src, visits)  # [G, G]
    visits[np.arange(num_tokens), src] = True
    width = int(slots.count.max())
    reps = slots.log2phy[split.pair_expert, :width]  # [M, R] -1 padded
    rep_gpu = slots.gpu_of_slot[np.maximum(reps, 0)]
    free = visits[split.pair_token[:, None], rep_gpu] & (reps >= 0)  # [M, R]
    pair_src = src[split.pair_token]
    if width <= 40:  # one int64 key per pair: source GPU, expert, free-replica bits
        key = (pair_src * len(slots.count) + split.pair_expert) * (1 << width) \
            + (free.astype(np.int64) << np.arange(width)).sum(1)
        classes, first, inverse, size = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    else:
        rows = np.column_stack([pair_src, split.pair_expert, free])
        classes, first, inverse, size = np.unique(rows, axis=0, return_index=True, return_inverse=True,
                                                  return_counts=True)
    inverse = inverse.ravel()
    c_src, c_free = pair_src[first], free[first]  # [C], [C, R]
    valid = reps[first] >= 0  # [C, R]
    var_c, var_r = np.nonzero(valid)  # one integer variable per (class, replica)
    var_gpu = rep_gpu[first][var_c, var_r]
    var_src = c_src[var_c]
    paid = ~c_free[var_c, var_r] & (var_gpu != var_src)
    us = 1e6  # the model in microseconds: HiGHS's tolerances (1e-7) would swamp costs in seconds
    secs = np.where(paid, us * cost.token_bytes / cost.bandwidth[var_src, var_gpu], 0.0)  # per pair
    nv = len(var_c)
    # variables: x [nv], tail pairs T, a2a microseconds A; minimise per_token * T + 2 A
    obj = np.concatenate([np.zeros(nv), [us * cost.per_token_s, 2.0]])
    fixed_load = np.bincount(slots.gpu_of_slot[split.fixed[split.fixed >= 0]], minlength=num_gpus)
    sec_matrix = us * fixed_copies * cost.token_bytes / cost.bandwidth
    fixed_send, fixed_recv = sec_matrix.sum(1), sec_matrix.sum(0)
    # rows: one equality per class (its pairs), then per GPU: load - T <= -fixed, send - A, receive - A
    num_classes, cols, g = len(classes), np.arange(nv), np.arange(num_gpus)
    rows = np.concatenate([var_c, num_classes + var_gpu, num_classes + num_gpus + var_src,
                           num_classes + 2 * num_gpus + var_gpu, num_classes + np.arange(3 * num_gpus)])
    columns = np.concatenate([cols, cols, cols, cols, np.full(num_gpus, nv), np.full(2 * num_gpus, nv + 1)])
    values = np.concatenate([np.ones(nv), np.ones(nv), secs, secs, -np.ones(3 * num_gpus)])
    matrix = coo_matrix((values, (rows, columns)), shape=(num_classes + 3 * num_gpus, nv + 2)).tocsc()
    upper = np.concatenate([size, -fixed_load, -fixed_send, -fixed_recv])
    lower = np.concatenate([size, np.full(3 * num_gpus, -np.inf)])
    x = highs_solve(obj, matrix, lower, upper, integer=nv if nv <= exact_vars else 0)
    counts = np.zeros(valid.shape)
    counts[var_c, var_r] = x[:nv]
    counts = round_rows(np.where(valid, counts, 0.0), size)
    # the pairs of class c, in pair order, fill its replicas in order: counts[c, 0] to the first, ...
    order = np.argsort(inverse, kind="stable")
    position = np.empty(len(inverse), dtype=np.int64)
    position[order] = np.arange(len(inverse)) - np.repeat(np.cumsum(size) - size, size)
    replica = (position[:, None] >= np.cumsum(counts, axis=1)[inverse]).sum(1)  # [M]
    chosen = split.fixed.copy()
    chosen[split.pair_token, split.pair_col] = reps[np.arange(len(reps)), replica]
    return chosen


def highs_solve(cost: np.ndarray, matrix, lower: np.ndarray, upper: np.ndarray, integer: int = 0) -> np.ndarray:
    """argmin cost @ x over x >= 0 with lower <= matrix @ x <= upper (HiGHS, called directly: scipy's
    wrapper doubles the time of these small models); the first `integer` variables integral. -> x"""
    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    model = highspy.HighsLp()
    model.num_col_, model.num_row_ = matrix.shape[1], matrix.shape[0]
    model.col_cost_, model.col_lower_ = cost, np.zeros(matrix.shape[1])
    model.col_upper_ = np.full(matrix.shape[1], highspy.kHighsInf)
    model.row_lower_ = np.where(np.isfinite(lower), lower, -highspy.kHighsInf)
    model.row_upper_ = np.where(np.isfinite(upper), upper, highspy.kHighsInf)
    model.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    model.a_matrix_.start_, model.a_matrix_.index_, model.a_matrix_.value_ = matrix.indptr, matrix.indices, matrix.data
    if integer:
        model.integrality_ = [highspy.HighsVarType.kInteger] * integer + \
            [highspy.HighsVarType.kContinuous] * (matrix.shape[1] - integer)
    highs.passModel(model)
    highs.run()
    status = highs.getModelStatus()
    assert status == highspy.HighsModelStatus.kOptimal, f"the split model is always feasible: {status}"
    return np.asarray(highs.getSolution().col_value)


def round_rows(share: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Integer rows summing to total [C]: floors of share [C, R] plus one for the largest remainders."""
    quota = np.floor(share + 1e-9).astype(np.int64)
    short = total - quota.sum(1)
    rank = np.argsort(np.argsort(-(share - quota), axis=1, kind="stable"), axis=1)
    return quota + (rank < short[:, None])


def choose_slots(ids: np.ndarray, token: np.ndarray, src: np.ndarray, slots: LayerSlots,
                 dispatch: str, cost: CostModel) -> np.ndarray:
    """The physical slot serving each token-expert pair under `dispatch`. ids [B, k] -> [B, k]"""
    if dispatch == "dynamic" or (slots.count <= 1).all():
        return pick_dynamic(ids, token, slots)
    if dispatch == "static":
        return pick_static(ids, src, slots, cost.node)
    if dispatch == "lp":
        return pick_lp(ids, src, slots, cost.num_gpus)
    assert dispatch == "lp_comm", f"unknown dispatch {dispatch}"
    return pick_lp_comm(ids, src, slots, cost)


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


def relay_copies(src: np.ndarray, on: np.ndarray, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical dispatch copies: (inter-node phase, intra-node phase), each [G, G] (src, dst).

    A token on GPU g (local rank g mod n) that needs GPUs on another node b sends one copy to the
    relay b * n + g mod n, which forwards it to b's other GPUs it needs; own-node GPUs get it directly.
    src [B], on [B, G] bool the GPUs each token needs."""
    num_gpus, per_node = cost.num_gpus, cost.gpus_per_node
    mask = on.copy()
    mask[np.arange(len(src)), src] = False
    tok, dst = np.nonzero(mask)
    away = cost.node[dst] != cost.node[src[tok]]
    relay = cost.node[dst] * per_node + src[tok] % per_node
    flat = lambda a, b: np.bincount(a * num_gpus + b, minlength=num_gpus * num_gpus).reshape(num_gpus, num_gpus)  # noqa: E731
    # one inter-node copy per (token, node): dedupe (token, relay)
    hop = np.unique(tok[away] * num_gpus + relay[away])
    inter = flat(src[hop // num_gpus], hop % num_gpus)
    forward = away & (relay != dst)
    intra = flat(src[tok[~away]], dst[~away]) + flat(relay[forward], dst[forward])
    return inter, intra


def simulate_layer(ids: np.ndarray, token: np.ndarray, src: np.ndarray, primary: np.ndarray,
                   combine_to_home: np.ndarray | None, slots: LayerSlots, cost: CostModel,
                   dispatch: str = "dynamic", hierarchical: bool = False) -> LayerStep:
    """One layer for B tokens at GPUs src [B] with experts ids [B, k], replicas chosen by `dispatch`.

    combine_to_home: [B] home GPUs to combine back to, or None to combine on the GPU of the
    primary expert (column primary [B] of ids). hierarchical: relay inter-node copies (then
    combine_to_home must be src).
    """
    slot = choose_slots(ids, token, src, slots, dispatch, cost)
    if combine_to_home is None:
        combine_to_home = slots.gpu_of_slot[slot[np.arange(len(src)), primary]]
    return layer_step(slot, src, combine_to_home, slots, cost, hierarchical)


def layer_step(slot: np.ndarray, src: np.ndarray, target: np.ndarray, slots: LayerSlots, cost: CostModel,
               hierarchical: bool = False) -> LayerStep:
    """Times and bytes of one layer whose pairs are served by slot [B, k]: tokens at src [B] dispatch,
    their partial results combine on target [B]."""
    num_gpus = cost.num_gpus
    dest = slots.gpu_of_slot[slot]  # [B, k]
    on = np.zeros((len(src), num_gpus), dtype=bool)
    on[np.arange(len(src))[:, None], dest] = True
    if hierarchical:
        inter, intra = relay_copies(src, on, cost)
        dispatch_s = a2a_time(inter, cost) + a2a_time(intra, cost)
        combine_s = a2a_time(intra.T, cost) + a2a_time(inter.T, cost)
        copies = 2 * (inter + intra)
    else:
        out = copy_matrix(src, on)
        back = copy_matrix(target, on).T
        dispatch_s, combine_s, copies = a2a_time(out, cost), a2a_time(back, cost), out + back
    per_slot = np.bincount(slot.ravel(), minlength=slots.num_slots)
    compute = cost.expert_time(per_slot).reshape(num_gpus, -1).sum(1)
    cross = cost.node[:, None] != cost.node[None, :]
    return LayerStep(dispatch_s=dispatch_s, combine_s=combine_s, compute_s=compute,
                     tokens=per_slot.reshape(num_gpus, -1).sum(1).astype(float),
                     bytes_intra=float(copies[~cross].sum() * cost.token_bytes),
                     bytes_inter=float(copies[cross].sum() * cost.token_bytes), out_gpu=target)


def primary_column(trace_ids: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Column of each token's primary expert: largest gate weight, else 0. [T, L, k] -> [T, L]"""
    if weights is None:
        return np.zeros(trace_ids.shape[:2], dtype=np.int64)
    return np.argmax(weights, axis=-1)


def choose_step_slots(ids: np.ndarray, primary: np.ndarray, slots: list[LayerSlots], cost: CostModel,
                      dataflow: str, dispatch: str) -> np.ndarray:
    """The slot of every pair of one step, layer by layer (token j starts on GPU j % G; with
    expert_to_expert it moves to its primary expert's GPU). ids [B, L, k], primary [B, L] -> [B, L, k]"""
    token = np.arange(ids.shape[0])
    src, out = token % cost.num_gpus, []
    for layer in range(ids.shape[1]):
        out.append(choose_slots(ids[:, layer], token, src, slots[layer], dispatch, cost))
        if dataflow == "expert_to_expert":
            src = slots[layer].gpu_of_slot[out[-1][token, primary[:, layer]]]
    return np.stack(out, 1)


def simulate_step(ids: np.ndarray, primary: np.ndarray, slots: list[LayerSlots], cost: CostModel,
                  dataflow: str, dispatch: str) -> list[LayerStep]:
    """Every layer of one step; token j starts on home GPU j % G. ids [B, L, k], primary [B, L]"""
    assert dataflow in DATAFLOWS, f"unknown dataflow {dataflow}"
    num_tokens, num_layers = ids.shape[:2]
    chosen = choose_step_slots(ids, primary, slots, cost, dataflow, dispatch)
    token = np.arange(num_tokens)
    home = token % cost.num_gpus
    src, out = home, []
    for layer in range(num_layers):
        to_home = dataflow != "expert_to_expert" or layer == num_layers - 1
        target = home if to_home else slots[layer].gpu_of_slot[chosen[token, layer, primary[:, layer]]]
        out.append(layer_step(chosen[:, layer], src, target, slots[layer], cost, dataflow == "hierarchical"))
        src = target
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
                 step_tokens: int, dataflow: str, dispatch: str) -> None:
    """Raise SimulationError (PlacementError for the map itself) naming the first disagreement."""
    if dataflow not in DATAFLOWS:
        raise SimulationError(f"dataflow={dataflow!r} is unknown; choose one of {list(DATAFLOWS)}")
    if dispatch not in DISPATCHES:
        raise SimulationError(f"dispatch={dispatch!r} is unknown; choose one of {list(DISPATCHES)}")
    check_placement(Placement(phy2log, num_gpus, 1, "simulated"), cost.num_gpus, num_experts, ids.shape[1],
                    routed=routed_experts(ids, num_experts))
    if not 1 <= step_tokens <= ids.shape[0]:
        raise SimulationError(f"step_tokens={step_tokens} but the trace has {ids.shape[0]} tokens; "
                              f"choose 1 <= step_tokens <= {ids.shape[0]}")


def simulate(phy2log: np.ndarray, num_gpus: int, ids: np.ndarray, primary: np.ndarray, num_experts: int,
             cost: CostModel, step_tokens: int, dataflow: str = "dispatch_combine",
             dispatch: str = "dynamic", progress: bool = False) -> SimResult:
    """Every full step of `step_tokens` consecutive tokens. phy2log [L, P], ids [T, L, k], primary [T, L]"""
    check_inputs(phy2log, num_gpus, ids, num_experts, cost, step_tokens, dataflow, dispatch)
    slots = layer_slots(phy2log, num_gpus, num_experts)
    steps = []
    for start in tqdm(range(0, ids.shape[0] - step_tokens + 1, step_tokens), desc=f"simulate {dispatch}",
                      unit="step", disable=not progress):
        window = slice(start, start + step_tokens)
        steps.append(simulate_step(ids[window].astype(np.int64), primary[window], slots, cost, dataflow, dispatch))
    field = lambda name: np.array([[getattr(layer, name) for layer in step] for step in steps])  # noqa: E731
    return SimResult(dispatch_s=field("dispatch_s"), combine_s=field("combine_s"), compute_s=field("compute_s"),
                     tokens=field("tokens"), bytes_intra=field("bytes_intra"), bytes_inter=field("bytes_inter"))


def compute_lower_bound(ids: np.ndarray, cost: CostModel, slots_per_gpu: int) -> float:
    """Compute tail of one layer-step that no placement with `slots_per_gpu` slots per GPU beats. ids [B, k]

    max(sum over experts of f(n_e) / G, f(n_max / c)): splitting an expert over replicas never lowers
    the summed time (f(a) + f(b) >= f(a + b)), and the hottest expert has at most c = min(G, 1 + P - E')
    copies (P slots, E' experts routed in the step, each needing one)."""
    load = np.bincount(ids.ravel(), minlength=1)
    active = int((load > 0).sum())
    copies = max(1, min(cost.num_gpus, 1 + cost.num_gpus * slots_per_gpu - active))
    spread = float(cost.expert_time(load).sum()) / cost.num_gpus
    return max(spread, float(cost.expert_time(np.array([load.max() / copies]))[0]))


def comm_lower_bound(ids: np.ndarray, cost: CostModel, slots_per_gpu: int, dataflow: str = "dispatch_combine"
                     ) -> float:
    """Dispatch + combine seconds of one layer-step that no placement with `slots_per_gpu` slots per GPU
    beats. ids [B, k]; token j of the step starts on GPU j % G.

    A GPU holds at most S = slots_per_gpu distinct experts, a node S * n, so a token with m distinct
    experts needs copies to >= ceil(m / S) - 1 other GPUs (>= ceil(m / (S n)) - 1 other nodes); and the
    pairs of GPU g's tokens served on g are at most the S largest expert counts among them, so g sends
    >= (pairs - that) / min(k, S) copies. A phase costs >= max over GPUs of its sends at the fastest
    link (+ the smallest latency if it sends anything) and >= all copies / G at the fastest link; the
    combine mirrors the dispatch. hierarchical: the inter-node phase alone (per-token node counts at
    the fastest inter-node link), or g's remote pairs over both phases (<= min(k, S n) per copy).
    expert_to_expert (tokens not at home after layer 0) uses only the per-token, all-GPU part.
    """
    num_gpus, per_node, b = cost.num_gpus, cost.gpus_per_node, cost.token_bytes
    off = ~np.eye(num_gpus, dtype=bool)
    fastest = float(cost.bandwidth[off].max()) if num_gpus > 1 else np.inf
    distinct = np.array([len(np.unique(row)) for row in ids]) if ids.shape[1] > 1 else np.ones(len(ids), int)
    need = np.maximum(-(-distinct // slots_per_gpu) - 1, 0)  # [B] other GPUs per token
    src = np.arange(len(ids)) % num_gpus
    total = float(need.sum()) * b / fastest / num_gpus
    if dataflow == "expert_to_expert":
        return 2 * total
    width = int(ids.max()) + 1
    pairs = np.unique(np.arange(len(ids))[:, None] * width + ids)  # distinct (token, expert) pairs
    counts = np.zeros((num_gpus, width))
    np.add.at(counts, (src[pairs // width], pairs % width), 1)
    local = -np.sort(-counts, axis=1)[:, :slots_per_gpu].sum(1)
    copies = np.maximum(np.bincount(src, weights=need, minlength=num_gpus),
                        (counts.sum(1) - local) / min(ids.shape[1], slots_per_gpu))  # [G] sends of each GPU
    min_latency = np.where(off, cost.latency, np.inf).min(1)
    cross = cost.node[:, None] != cost.node[None, :]
    if dataflow == "hierarchical" and cross.any():  # on one node it is dispatch_combine
        inter = np.maximum(-(-distinct // (slots_per_gpu * per_node)) - 1, 0)
        inter_bw = float(cost.bandwidth[cross].max())
        inter_lat = np.where(cross, cost.latency, np.inf).min(1)
        sends = np.bincount(src, weights=inter, minlength=num_gpus)
        inter_phase = sends * b / inter_bw + np.where(sends > 0, inter_lat, 0.0)
        # g's remote pairs leave g in both phases: <= min(k, S n) pairs per inter-node copy
        remote = (counts.sum(1) - local) / min(ids.shape[1], slots_per_gpu * per_node)
        both_phases = remote * b / fastest + np.where(remote > 0, min_latency, 0.0)
        return 2 * max(float(inter_phase.max()), float(both_phases.max()), total)
    per_gpu = copies * b / fastest + np.where(copies > 0, min_latency, 0.0)
    return 2 * max(float(per_gpu.max()), total)


def lower_bound(ids: np.ndarray, cost: CostModel, slots_per_gpu: int, step_tokens: int,
                dataflow: str = "dispatch_combine") -> float:
    """Step time (mean over full steps of the sum over layers) that no placement with `slots_per_gpu`
    slots per GPU, under any dispatch, beats: compute_lower_bound + comm_lower_bound. ids [T, L, k]"""
    steps = []
    for start in range(0, ids.shape[0] - step_tokens + 1, step_tokens):
        window = ids[start:start + step_tokens].astype(np.int64)
        steps.append(sum(compute_lower_bound(window[:, layer], cost, slots_per_gpu)
                         + comm_lower_bound(window[:, layer], cost, slots_per_gpu, dataflow)
                         for layer in range(ids.shape[1])))
    if not steps:
        raise SimulationError(f"step_tokens={step_tokens} but the trace has {ids.shape[0]} tokens; "
                              f"choose 1 <= step_tokens <= {ids.shape[0]}")
    return float(np.mean(steps))
