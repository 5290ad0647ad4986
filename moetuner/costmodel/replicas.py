"""Dispatch: which replica of an expert serves each token-expert pair of a batch (one MoE layer;
docs/formulation.md section 3.2).

DISPATCHES (moetuner.costmodel.settings), named after the engines that use them:
- `dynamic`: even split over an expert's replicas, token j takes replica j mod count (SGLang
  `dynamic`, vLLM);
- `static`: each source GPU has one fixed replica per expert, the nearest (own GPU, own node, any;
  SGLang `static`);
- `lp`: the split that minimises the most token-expert pairs on one GPU, exact (DeepSeek LPLB, SGLang
  `lp`);
- `lp_comm` (ours): the split that minimises the predicted layer time, compute tail and all-to-all
  together (a small MILP, or its LP relaxation rounded, per batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import maximum_flow

from moetuner.costmodel.cost import CostModel, copy_matrix
from moetuner.placement import LayerSlots
from moetuner.costmodel.settings import Dataflow, Dispatch


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
    scatter all-to-all, max over GPUs of send and receive seconds; the combine mirrors it).

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
    num_classes, cols = len(classes), np.arange(nv)
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
                 dispatch: Dispatch, cost: CostModel) -> np.ndarray:
    """The physical slot serving each token-expert pair under `dispatch`. ids [B, k] -> [B, k]"""
    if dispatch == "dynamic" or (slots.count <= 1).all():
        return pick_dynamic(ids, token, slots)
    if dispatch == "static":
        return pick_static(ids, src, slots, cost.node)
    if dispatch == "lp":
        return pick_lp(ids, src, slots, cost.num_gpus)
    assert dispatch == "lp_comm", f"unknown dispatch {dispatch}"
    return pick_lp_comm(ids, src, slots, cost)


def choose_step_slots(ids: np.ndarray, primary: np.ndarray, slots: list[LayerSlots], cost: CostModel,
                      dataflow: Dataflow, dispatch: Dispatch, timings: list[float] | None = None) -> np.ndarray:
    """The slot of every pair of one step, layer by layer (token j starts on GPU j % G; with
    expert_to_expert it moves to its primary expert's GPU). ids [B, L, k], primary [B, L] -> [B, L, k]

    timings: when given, the wall seconds of each layer's choose_slots are appended to it."""
    token = np.arange(ids.shape[0])
    src, out = token % cost.num_gpus, []
    for layer in range(ids.shape[1]):
        start = time.perf_counter()
        out.append(choose_slots(ids[:, layer], token, src, slots[layer], dispatch, cost))
        if timings is not None:
            timings.append(time.perf_counter() - start)
        if dataflow == "expert_to_expert":
            src = slots[layer].gpu_of_slot[out[-1][token, primary[:, layer]]]
    return np.stack(out, 1)
