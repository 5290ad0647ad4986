"""Lower bounds on a step's time that no placement beats (docs/formulation.md section 5).

The compute part bounds the slowest GPU from the summed expert time and the hottest expert's copies; the
communication part bounds every all-to-all phase from the copies a token must make. Both use the same
CostModel as the simulator, so a bound and a simulated time are directly comparable.
"""

from __future__ import annotations

import numpy as np

from moetuner.costmodel.cost import CostModel, SimulationError
from moetuner.costmodel.settings import Dataflow


def compute_lower_bound(ids: np.ndarray, cost: CostModel, slots_per_gpu: int) -> float:
    """Compute tail of one layer-step that no placement with `slots_per_gpu` slots per GPU beats. ids [B, k]

    max(sum over experts of f(n_e) / G, f(n_max / c)): splitting an expert over replicas never lowers
    the summed time (f(a) + f(b) >= f(a + b)), and the hottest expert has at most c = min(G, 1 + P - E')
    copies (P slots, E' experts routed in the step, each needing one)."""
    load = np.bincount(ids.ravel(), minlength=1)
    active = int((load > 0).sum())
    copies = max(1, min(cost.num_gpus, 1 + cost.num_gpus * slots_per_gpu - active))
    spread = float(cost.expert_time(load).sum()) / cost.num_gpus
    busy = cost.kernel_s if load.sum() > 0 else 0.0  # some GPU runs the layer's kernels
    return max(spread, float(cost.expert_time(np.array([load.max() / copies]))[0])) + busy


def comm_lower_bound(ids: np.ndarray, cost: CostModel, slots_per_gpu: int, dataflow: Dataflow = "dispatch_combine"
                     ) -> float:
    """Scatter + combine seconds of one layer-step that no placement with `slots_per_gpu` slots per GPU
    beats. ids [B, k]; token j of the step starts on GPU j % G.

    A GPU holds at most S = slots_per_gpu distinct experts, a node S * n, so a token with m distinct
    experts needs copies to >= ceil(m / S) - 1 other GPUs (>= ceil(m / (S n)) - 1 other nodes); and the
    pairs of GPU g's tokens served on g are at most the S largest expert counts among them, so g sends
    >= (pairs - that) / min(k, S) copies. A phase costs >= max over GPUs of its sends at the fastest
    link (+ the smallest latency if it sends anything) and >= all copies / G at the fastest link; the
    combine mirrors the scatter. hierarchical: the inter-node phase alone (per-token node counts at
    the fastest inter-node link), or g's remote pairs over both phases (<= min(k, S n) per copy).
    expert_to_expert (tokens not at home after layer 0) uses only the per-token, all-GPU part.
    """
    num_gpus, per_node = cost.num_gpus, cost.gpus_per_node
    b = sum(cost.phase_bytes) / 2  # 2 * (a bound at b) = the scatter bound + the combine bound
    off = ~np.eye(num_gpus, dtype=bool)
    cross = cost.node[:, None] != cost.node[None, :]
    fastest = float(cost.bandwidth[off].max()) if num_gpus > 1 else np.inf
    if cost.link_model == "concurrent" and cross.any() and (off & ~cross).any():  # both ports at once
        fastest = float(cost.bandwidth[off & ~cross].max() + cost.bandwidth[cross].max())
    ranked = np.sort(ids, axis=1)
    first = np.ones(ids.shape, dtype=bool)  # [B, k] the first pair of each distinct (token, expert)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    distinct = first.sum(1)  # [B] distinct experts per token
    need = np.maximum(-(-distinct // slots_per_gpu) - 1, 0)  # [B] other GPUs per token
    src = np.arange(len(ids)) % num_gpus
    total = float(need.sum()) * b / fastest / num_gpus
    if dataflow == "expert_to_expert":
        return 2 * total
    width = int(ids.max()) + 1
    token = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)[first]  # of each distinct pair
    counts = np.bincount(src[token] * width + ranked[first], minlength=num_gpus * width).reshape(num_gpus, width)
    local = -np.sort(-counts, axis=1)[:, :slots_per_gpu].sum(1)
    copies = np.maximum(np.bincount(src, weights=need, minlength=num_gpus),
                        (counts.sum(1) - local) / min(ids.shape[1], slots_per_gpu))  # [G] sends of each GPU
    min_latency = np.where(off, cost.latency, np.inf).min(1)
    if dataflow == "hierarchical" and cross.any():  # on one node it is dispatch_combine
        inter = np.maximum(-(-distinct // (slots_per_gpu * per_node)) - 1, 0)
        inter_bw = float(cost.bandwidth[cross].max())
        inter_lat = np.where(cross, cost.latency, np.inf).min(1)
        sends = np.bincount(src, weights=inter, minlength=num_gpus)
        inter_phase = sends * b / inter_bw + np.where(sends > 0, inter_lat, 0.0)
        # g's remote pairs leave g in both phases: <= min(k, S n) pairs per inter-node copy
        remote = (counts.sum(1) - local) / min(ids.shape[1], slots_per_gpu * per_node)
        both_phases = remote * b / fastest + np.where(remote > 0, min_latency, 0.0)
        if cost.link_model == "concurrent":  # pipelined phases: the longer is >= half their sum
            both_phases = both_phases / 2
        return 2 * max(float(inter_phase.max()), float(both_phases.max()), total)
    per_gpu = copies * b / fastest + np.where(copies > 0, min_latency, 0.0)
    return 2 * max(float(per_gpu.max()), total)


def lower_bound(ids: np.ndarray, cost: CostModel, slots_per_gpu: int, step_tokens: int,
                dataflow: Dataflow = "dispatch_combine") -> float:
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
