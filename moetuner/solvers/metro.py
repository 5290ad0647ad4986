"""A METRO-style placement: balance the experts each GPU activates per step, not the tokens (arXiv 2512.09277).

What it reproduces: METRO's objective, not its algorithm. METRO (Minimum Expert Token ROuting) is a per-batch
token router: in the memory-bound decode regime a GPU's MoE time follows the number of distinct experts it
activates (each reads its weights once), so METRO routes the tokens of replicated experts to minimise the
largest activated-expert count per GPU, where EPLB balances tokens. This solver moves that objective into the
placement, the decision moetuner makes: per layer, cut the profile into steps of `step_tokens` tokens (the
problem's step size; decode-sized steps make the objective bite: at 512-token steps of DeepSeek-V2-Lite almost
every expert is active in every step), let a[s, e] = 1 when expert e gets a token in step s, and place each
expert on one GPU (at most S per GPU) to minimise

    sum over steps s of max over GPUs g of sum_{e on g} a[s, e]        (MIP, HiGHS; objective reported /steps)

warm-started from a greedy (most often active expert first onto the GPU whose busiest step grows least). The
extra slots of `replicas` take hot replicas (completion.fill_hot_replicas) as every solver's do unless
`fill_replicas: false`; METRO's router, which would pick among them, is not modelled (the simulator's
dispatches are the engines').
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pulp

from moetuner.placement import Placement
from moetuner.solvers.completion import finish
from moetuner.solvers.mip import MAX_NODES, TIME_CAP_S, MipResult, budget_bound_by, solve_mip
from moetuner.solvers.problem import PlacementProblem


def step_activation(ids: np.ndarray, step_tokens: int, num_experts: int) -> np.ndarray:
    """a[s, e]: expert e gets a token in step s (full steps of consecutive tokens; a single partial step when
    the profile is shorter than one). ids [T, k] of one layer -> [S, E] bool"""
    num_steps = max(1, ids.shape[0] // step_tokens)
    size = min(step_tokens, ids.shape[0])
    out = np.zeros((num_steps, num_experts), dtype=bool)
    for s in range(num_steps):
        out[s, np.unique(ids[s * size:(s + 1) * size])] = True
    return out


def activated_objective(active: np.ndarray, gpu_of: np.ndarray, num_gpus: int) -> float:
    """sum over steps of the largest activated-expert count on a GPU. active [S, E], gpu_of [E] -> float"""
    per_gpu = np.stack([np.bincount(gpu_of, weights=row, minlength=num_gpus) for row in active.astype(float)])
    return float(per_gpu.max(1).sum())


def greedy_activation(active: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Most often active expert first, onto the GPU with room whose per-step counts grow the objective least
    (ties: the fewest experts, then the lowest GPU). active [S, E] -> gpu_of [E]"""
    num_steps, num_experts = active.shape
    counts = np.zeros((num_steps, num_gpus))
    used = np.zeros(num_gpus, dtype=np.int64)
    gpu_of = np.zeros(num_experts, dtype=np.int64)
    for e in np.argsort(-active.sum(0), kind="stable"):
        grown = np.maximum(counts.max(1, keepdims=True), counts + active[:, [e]]).sum(0)  # [G]
        gpu = min(np.flatnonzero(used < slots_per_gpu), key=lambda g: (grown[g], used[g], g))
        counts[:, gpu] += active[:, e]
        used[gpu] += 1
        gpu_of[e] = gpu
    return gpu_of


def activation_mip(active: np.ndarray, num_gpus: int, slots_per_gpu: int, start: np.ndarray,
                   mip: Mapping[str, Any]) -> tuple[np.ndarray, MipResult]:
    """The MIP of one layer (module docstring), warm-started from gpu_of `start` [E]; (gpu_of [E], result).
    active [S, E]. Without a solution within the budget, `start` is returned."""
    num_steps, num_experts = active.shape
    prob = pulp.LpProblem("metro", pulp.LpMinimize)
    x = {(e, g): pulp.LpVariable(f"x_{e}_{g}", cat="Binary") for e in range(num_experts) for g in range(num_gpus)}
    peak = [pulp.LpVariable(f"peak_{s}", 0) for s in range(num_steps)]
    prob += pulp.lpSum(peak)
    for e in range(num_experts):
        prob += pulp.lpSum(x[e, g] for g in range(num_gpus)) == 1
    for g in range(num_gpus):
        prob += pulp.lpSum(x[e, g] for e in range(num_experts)) <= slots_per_gpu
        for s in range(num_steps):
            prob += peak[s] >= pulp.lpSum(x[e, g] for e in np.flatnonzero(active[s]))
    for (e, g), var in x.items():
        var.setInitialValue(float(start[e] == g))
    counts = np.stack([np.bincount(start, weights=row, minlength=num_gpus) for row in active.astype(float)])
    for s, var in enumerate(peak):
        var.setInitialValue(float(counts[s].max()))
    result = solve_mip(prob, **mip, warm_start=True)
    if not result.has_solution:
        return start, result
    gpu_of = np.array([max(range(num_gpus), key=lambda g: x[e, g].varValue or 0.0) for e in range(num_experts)])
    return gpu_of, result


def phy2log_of(gpu_of: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """One layer's slots from each expert's GPU, in expert order per GPU, empty slots -1. gpu_of [E] -> [G * S]"""
    row = -np.ones(num_gpus * slots_per_gpu, dtype=np.int64)
    for g in range(num_gpus):
        mine = np.flatnonzero(gpu_of == g)
        assert len(mine) <= slots_per_gpu, "a GPU holds more experts than its slots"
        row[g * slots_per_gpu:g * slots_per_gpu + len(mine)] = mine
    return row


def solve_metro(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """Options: max_nodes (per layer's MIP, the work budget; MAX_NODES), seed (0), time_limit_s (per layer's
    MIP, a safety cap; TIME_CAP_S), mip_solver, gap_rel, fill_replicas (module docstring)."""
    start_time = time.perf_counter()
    mip = {"mip_solver": str(options.get("mip_solver", "highs")),
           "time_limit_s": float(options.get("time_limit_s", TIME_CAP_S)), "gap_rel": float(options.get("gap_rel", 0.0)),
           "max_nodes": int(options.get("max_nodes", MAX_NODES)), "seed": int(options.get("seed", 0))}
    ids = problem.profile.topk_ids.astype(np.int64)
    rows, objective, results = [], 0.0, []
    bound: float | None = 0.0  # None once a layer's MIP gives none
    for layer in range(problem.num_layers):
        active = step_activation(ids[:, layer], problem.step_tokens, problem.num_experts)
        start = greedy_activation(active, problem.num_gpus, problem.slots_per_gpu)
        gpu_of, result = activation_mip(active, problem.num_gpus, problem.slots_per_gpu, start, mip)
        value = activated_objective(active, gpu_of, problem.num_gpus) / len(active)
        objective += value
        bound = None if bound is None or result.bound is None else bound + result.bound / len(active)
        results.append(result)
        rows.append(phy2log_of(gpu_of, problem.num_gpus, problem.slots_per_gpu))
    proven = all(r.status == "optimal" for r in results)
    return finish(problem, np.stack(rows), "metro", start_time, status="optimal" if proven else "feasible",
                  budget_bound_by=budget_bound_by(results), max_nodes=mip["max_nodes"],
                  objective=objective, bound=bound, fill=bool(options.get("fill_replicas", True)),
                  objective_name="mean over profile steps of the most activated experts on a GPU, summed over layers")
