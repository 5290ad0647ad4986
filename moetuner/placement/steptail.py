"""steptail: local search over the simulator's per-step tail objective, warm-started from heuristics.

Objective: the simulator's step time (sum over layers of dispatch + compute tail + combine) averaged
over the profile's steps of `step_tokens` tokens, so every step's tail counts, not the balance of the
summed load. Steps:
1. warm start: run each solver in `warm_starts` (default WARM_STARTS), keep per layer the row with the lowest profile
   layer time (dispatch-combine layers are independent; for expert-to-expert the best whole map);
2. per layer, within an equal share of `time_limit_s`: random moves, kept when the layer's mean time
   over the profile steps drops: swap two slots on different GPUs (one of them on the layer's
   slowest GPU half of the time), or, with replicas, point a replica slot at a hotter expert;
3. return the better of the result and the warm start on the full profile objective.
Bound: per step and layer, compute >= max(sum_e f(n_e) / G, f(n_max / c_max)) with c_max =
min(G, 1 + P - E) copies of an expert, communication >= 0; summed over layers, averaged over steps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from moetuner.placement.baselines import finish
from moetuner.placement.layout import Placement, logical_replica_count
from moetuner.placement.problem import PlacementProblem, get_solver
from moetuner.profiling.stats import step_load
from moetuner.simulator import CostModel, cost_model, layer_slots, primary_column, simulate, simulate_layer

WARM_STARTS = ("eplb", "greedy", "exflow", "round_robin", "contiguous")


def profile_steps(problem: PlacementProblem) -> tuple[np.ndarray, np.ndarray]:
    """Profile ids and primary columns cut into steps. -> [S, B, L, k], [S, B, L]"""
    trace = problem.profile
    tokens = min(problem.step_tokens, trace.num_tokens)
    steps = trace.num_tokens // tokens
    ids = trace.topk_ids[:steps * tokens].astype(np.int64)
    primary = primary_column(trace.topk_ids, trace.topk_weights)[:steps * tokens]
    return ids.reshape(steps, tokens, *ids.shape[1:]), primary.reshape(steps, tokens, -1)


def step_objective(phy2log: np.ndarray, problem: PlacementProblem, cost: CostModel, ids: np.ndarray,
                   primary: np.ndarray, dataflow: str, policy: str) -> np.ndarray:
    """Mean over profile steps of each layer's time. phy2log [L, P], ids [S, B, L, k] -> [L]"""
    flat_ids, flat_primary = ids.reshape(-1, *ids.shape[2:]), primary.reshape(-1, primary.shape[-1])
    result = simulate(phy2log, problem.num_gpus, flat_ids, flat_primary, problem.num_experts, cost,
                      ids.shape[1], dataflow, policy)
    return result.layer_time_s.mean(0)


def lower_bound(problem: PlacementProblem, cost: CostModel, ids: np.ndarray) -> float:
    """Mean over steps of the summed per-layer compute bound (communication bound 0). ids [S, B, L, k]"""
    loads = step_load(ids.reshape(-1, *ids.shape[2:]), problem.num_experts, ids.shape[1])  # [S, L, E]
    max_copies = min(problem.num_gpus, 1 + problem.num_slots - problem.num_experts)
    spread = cost.expert_time(loads).sum(-1) / problem.num_gpus
    hottest = cost.expert_time(loads.max(-1) / max_copies)
    return float(np.maximum(spread, hottest).sum(1).mean())


class LayerSearch:
    """Mean time of one layer over the profile steps, for a candidate row of slots."""

    def __init__(self, problem: PlacementProblem, cost: CostModel, ids: np.ndarray, primary: np.ndarray,
                 src: np.ndarray, back: np.ndarray | None, policy: str) -> None:
        self.problem, self.cost, self.policy = problem, cost, policy
        self.ids, self.primary, self.src, self.back = ids, primary, src, back  # [S, B, k], [S, B], [S, B]
        self.token = np.arange(ids.shape[1])

    def evaluate(self, row: np.ndarray) -> tuple[float, np.ndarray]:
        """(mean layer time, per-GPU compute + traffic time summed over steps [G]) of a row [P]."""
        slots = layer_slots(row[None], self.problem.num_gpus, self.problem.num_experts)[0]
        total, busy = 0.0, np.zeros(self.problem.num_gpus)
        for s in range(len(self.ids)):
            back = None if self.back is None else self.back[s]
            step = simulate_layer(self.ids[s], self.token, self.src[s], self.primary[s], back, slots,
                                  self.cost, self.policy)
            total += step.time_s
            busy += step.compute_s
        return total / len(self.ids), busy


def propose(row: np.ndarray, busy: np.ndarray, load: np.ndarray, slots_per_gpu: int,
            rng: np.random.Generator) -> np.ndarray:
    """A neighbour of row [P]: a swap of two slots on different GPUs or a replica re-pointed. load [E]"""
    new = row.copy()
    counts = np.bincount(row[row >= 0], minlength=len(load))
    spare = np.flatnonzero((row >= 0) & (counts[np.maximum(row, 0)] > 1))
    if len(spare) and rng.random() < 0.3:
        slot = rng.choice(spare)
        share = load / np.maximum(counts, 1)
        new[slot] = rng.choice(len(load), p=share / share.sum()) if share.sum() > 0 else new[slot]
        return new
    gpu_a = int(np.argmax(busy)) if rng.random() < 0.5 else int(rng.integers(len(busy)))
    a = gpu_a * slots_per_gpu + int(rng.integers(slots_per_gpu))
    b = int(rng.integers(len(row)))
    if b // slots_per_gpu != gpu_a:
        new[a], new[b] = row[b], row[a]
    return new


def best_rows(candidates: list[np.ndarray], scores: list[np.ndarray], separable: bool) -> np.ndarray:
    """Per layer the row of the best candidate (separable), else the best whole map. [L, P]"""
    stacked = np.stack(scores)  # [C, L]
    if separable:
        pick = stacked.argmin(0)
        return np.stack([candidates[c][layer] for layer, c in enumerate(pick)])
    return candidates[int(stacked.sum(1).argmin())].copy()


def solve_steptail(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """Local search on the per-step tail objective of the profile (see module docstring).

    options: time_limit_s (10), dataflow (dispatch_combine), replica_policy (balanced),
    warm_starts (WARM_STARTS), seed (0).
    """
    start = time.perf_counter()
    dataflow = str(options.get("dataflow", "dispatch_combine"))
    policy = str(options.get("replica_policy", "balanced"))
    deadline = start + float(options.get("time_limit_s", 10.0))
    rng = np.random.default_rng(int(options.get("seed", 0)))
    trace = problem.profile
    cost = cost_model(problem.topology, trace.hidden_size, trace.moe_intermediate_size)
    ids, primary = profile_steps(problem)
    objective = lambda phy: step_objective(phy, problem, cost, ids, primary, dataflow, policy)  # noqa: E731

    names = options.get("warm_starts", WARM_STARTS)
    warm = [get_solver(name)(problem, {}).phy2log for name in names]
    warm_scores = [objective(phy) for phy in warm]
    phy2log = best_rows(warm, warm_scores, separable=dataflow == "dispatch_combine")
    warm_objective = float(min(s.sum() for s in warm_scores))
    home = np.broadcast_to(np.arange(ids.shape[1]) % problem.num_gpus, ids.shape[:2])  # [S, B]
    src, moves = home, 0
    for layer in range(problem.num_layers):
        layer_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (problem.num_layers - layer)
        last = layer == problem.num_layers - 1
        back = home if dataflow == "dispatch_combine" or last else None
        search = LayerSearch(problem, cost, ids[:, :, layer], primary[:, :, layer], src, back, policy)
        best, busy = search.evaluate(phy2log[layer])
        load = np.bincount(ids[:, :, layer].ravel(), minlength=problem.num_experts).astype(float)
        while time.perf_counter() < layer_deadline:
            row = propose(phy2log[layer], busy, load, problem.slots_per_gpu, rng)
            score, row_busy = search.evaluate(row)
            moves += 1
            if score < best:
                best, busy, phy2log[layer] = score, row_busy, row
        if dataflow == "expert_to_expert" and not last:
            slots = layer_slots(phy2log[layer][None], problem.num_gpus, problem.num_experts)[0]
            gpu = slots.gpu_of_slot[slots.log2phy[ids[:, :, layer], 0]]  # [S, B, k] first replica
            src = np.take_along_axis(gpu, primary[:, :, layer][..., None], -1)[..., 0]
    final = float(objective(phy2log).sum())
    if final > warm_objective:
        phy2log, final = best_rows(warm, warm_scores, separable=False), warm_objective
    assert (logical_replica_count(phy2log, problem.num_experts) > 0).all(), "every expert keeps a slot"
    return finish(problem, phy2log, "steptail", start, status="heuristic", objective=final,
                  bound=lower_bound(problem, cost, ids), fill=False, objective_kind="profile_step_time_s",
                  dataflow=dataflow, replica_policy=policy, warm_objective=warm_objective, moves=moves)
