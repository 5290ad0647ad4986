"""MoETuner's two-stage ILPs (arXiv 2502.06643, section 4.2), as published with its gaps fixed
(docs/formulation.md section 4 states both versions and each fix).

ILP1 (per layer) partitions the E experts into G clusters, minimising the L1 deviation of cluster
load from the mean. ILP2 (all layers) maps clusters to GPUs, one per GPU per layer, minimising the sum
over layer transitions of the busiest directed GPU link (traffic / bandwidth), under a memory balance
of the expert count per GPU summed over layers.

Cluster sizes: faithful (`equal_cluster_size: false`) lets sizes vary from 1 to S = ceil(E/G) +
replicas (the slots a GPU has per layer), so with replicas=0 and G | E every cluster has E/G experts;
`equal_cluster_size: true` fixes sizes to floor/ceil(E/G), which real engines need. Link cost is
(fastest bandwidth / link bandwidth) per token, so the ILP2 objective counts token transfers in
units of the fastest link. An ILP that finds no solution in its time limit (or ILP2 too large to
build) falls back to a heuristic (greedy balance for ILP1, affinity assignment for ILP2) and the
placement's status says `fallback`.
Engine setting reproduced: none (MoETuner is a paper's offline placement, not an engine option); a
placement it computes reaches SGLang through `--init-expert-location` (moetuner/engines.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pulp
from tqdm import tqdm

from moetuner.solvers.baselines import greedy_phy2log
from moetuner.solvers.completion import finish
from moetuner.solvers.exflow import follow_affinity, phy2log_from_gpus
from moetuner.placement import Placement
from moetuner.solvers.mip import MAX_NODES, TIME_CAP_S, MipResult, budget_bound_by, solve_mip
from moetuner.solvers.problem import PlacementProblem


def ilp1_objective(load: np.ndarray, cluster_of: np.ndarray, num_clusters: int) -> float:
    """sum_c |T_c - mean|, T_c the load of cluster c. load, cluster_of: [E]"""
    totals = np.bincount(cluster_of, weights=load, minlength=num_clusters)
    return float(np.abs(totals - load.sum() / num_clusters).sum())


def build_ilp1(load: np.ndarray, num_clusters: int, min_size: int, max_size: int
               ) -> tuple[pulp.LpProblem, dict[tuple[int, int], pulp.LpVariable], list[pulp.LpVariable]]:
    """ILP1 of one layer: x[c, e] = 1 if expert e is in cluster c, d[c] = |T_c - mean|. load: [E]"""
    num_experts = len(load)
    mean = float(load.sum()) / num_clusters
    prob = pulp.LpProblem("moetuner_ilp1", pulp.LpMinimize)
    x = {(c, e): prob.add_variable(f"x_{c}_{e}", cat="Binary") for c in range(num_clusters) for e in range(num_experts)}
    dev = [prob.add_variable(f"d_{c}", lowBound=0) for c in range(num_clusters)]
    prob += pulp.lpSum(dev)
    for e in range(num_experts):
        prob += pulp.lpSum(x[c, e] for c in range(num_clusters)) == 1
    for c in range(num_clusters):
        size = pulp.lpSum(x[c, e] for e in range(num_experts))
        prob += size >= min_size
        prob += size <= max_size
        total = pulp.lpSum(float(load[e]) * x[c, e] for e in range(num_experts))
        prob += dev[c] >= total - mean
        prob += dev[c] >= mean - total
    prob += x[0, int(np.argmax(load))] == 1  # clusters are interchangeable: fix one symmetric choice
    return prob, x, dev


def solve_ilp1(load: np.ndarray, num_clusters: int, min_size: int, max_size: int,
               mip: Mapping[str, Any], start: np.ndarray | None = None) -> tuple[np.ndarray | None, MipResult]:
    """Cluster of every expert ([E], None without a solution) and the solve record.

    start: a cluster per expert [E] to start from (ignored by the solver if it breaks a constraint).
    """
    prob, x, dev = build_ilp1(load, num_clusters, min_size, max_size)
    if start is not None:
        start = _relabel(start, first=int(np.argmax(load)))
        for (c, e), var in x.items():
            var.setInitialValue(float(start[e] == c))
        totals = np.bincount(start, weights=load, minlength=num_clusters)
        for c, var in enumerate(dev):
            var.setInitialValue(abs(totals[c] - load.sum() / num_clusters))
    result = solve_mip(prob, **mip, warm_start=start is not None)
    if not result.has_solution:
        return None, result
    cluster_of = np.array([max(range(num_clusters), key=lambda c: x[c, e].varValue or 0.0)
                           for e in range(len(load))], dtype=np.int64)
    return cluster_of, result


def _relabel(cluster_of: np.ndarray, first: int) -> np.ndarray:
    """Swap cluster labels so that expert `first` is in cluster 0 (ILP1's symmetry fix). [E]"""
    old = cluster_of[first]
    return np.where(cluster_of == old, 0, np.where(cluster_of == 0, old, cluster_of))


def cluster_transitions(transition: np.ndarray, cluster_of: np.ndarray, num_clusters: int) -> np.ndarray:
    """Cl[l, c1, c2]: transition mass from cluster c1 of layer l to c2 of layer l+1. [L-1, C, C]

    transition: [L-1, E, E]; cluster_of: [L, E].
    """
    out = np.zeros((transition.shape[0], num_clusters, num_clusters))
    for layer, mass in enumerate(transition):
        src = np.eye(num_clusters)[cluster_of[layer]]  # [E, C]
        dst = np.eye(num_clusters)[cluster_of[layer + 1]]
        out[layer] = src.T @ mass @ dst
    return out


def link_cost(bandwidth: np.ndarray) -> np.ndarray:
    """Cost of one token on each directed link: fastest bandwidth / link bandwidth, 0 on-GPU. [G, G]"""
    off = ~np.eye(len(bandwidth), dtype=bool)
    cost = np.zeros_like(bandwidth, dtype=float)
    if off.any():
        cost[off] = bandwidth[off].max() / bandwidth[off]
    return cost


def link_tails(cluster_mass: np.ndarray, gpu_of_cluster: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Per layer transition, the cost-weighted mass on the busiest directed link g1 != g2. [L-1]

    cluster_mass: [L-1, C, C]; gpu_of_cluster: [L, C]; cost: [G, G].
    """
    num_gpus = len(cost)
    tails = np.zeros(len(cluster_mass))
    for layer, mass in enumerate(cluster_mass):
        src = np.eye(num_gpus)[gpu_of_cluster[layer]]  # [C, G]
        dst = np.eye(num_gpus)[gpu_of_cluster[layer + 1]]
        tails[layer] = (src.T @ mass @ dst * cost).max(initial=0.0)
    return tails


def ilp2_objective(cluster_mass: np.ndarray, gpu_of_cluster: np.ndarray, cost: np.ndarray) -> float:
    """ILP2's objective: the sum over layer transitions of the busiest link's cost-weighted mass."""
    return float(link_tails(cluster_mass, gpu_of_cluster, cost).sum())


def ilp2_size(cluster_mass: np.ndarray, num_gpus: int) -> int:
    """Number of linearisation variables z ILP2 needs."""
    return int(np.count_nonzero(cluster_mass)) * num_gpus * (num_gpus - 1)


def build_ilp2(cluster_mass: np.ndarray, sizes: np.ndarray, cost: np.ndarray) -> tuple[
        pulp.LpProblem, dict[tuple[int, int, int], pulp.LpVariable],
        dict[tuple[int, int, int, int, int], pulp.LpVariable], list[pulp.LpVariable]]:
    """ILP2: y[c, g, l] = 1 if cluster c of layer l runs on GPU g; sizes: [L, C] experts per cluster.

    Returns (prob, y, z[c1, g1, c2, g2, l] = y[c1, g1, l] * y[c2, g2, l+1], t[l] = link tail).
    """
    num_layers, num_clusters = sizes.shape
    num_gpus = len(cost)
    gpus, clusters = range(num_gpus), range(num_clusters)
    prob = pulp.LpProblem("moetuner_ilp2", pulp.LpMinimize)
    y = {(c, g, l): prob.add_variable(f"y_{c}_{g}_{l}", cat="Binary")
         for l in range(num_layers) for c in clusters for g in gpus}
    t = [prob.add_variable(f"t_{l}", lowBound=0) for l in range(num_layers - 1)]
    prob += pulp.lpSum(t)
    z = {}
    for l, mass in enumerate(cluster_mass):
        link = {pair: [] for pair in np.ndindex(num_gpus, num_gpus) if pair[0] != pair[1]}
        for c1, c2 in zip(*np.nonzero(mass)):
            for g1, g2 in link:
                zv = z[c1, g1, c2, g2, l] = prob.add_variable(f"z_{c1}_{g1}_{c2}_{g2}_{l}", lowBound=0)
                prob += zv >= y[c1, g1, l] + y[c2, g2, l + 1] - 1
                link[g1, g2].append(float(mass[c1, c2] * cost[g1, g2]) * zv)
        for terms in link.values():
            prob += t[l] >= pulp.lpSum(terms)
    for l in range(num_layers):
        for c in clusters:
            prob += pulp.lpSum(y[c, g, l] for g in gpus) == 1
        for g in gpus:
            prob += pulp.lpSum(y[c, g, l] for c in clusters) == 1
    experts = int(sizes.sum())
    for g in gpus:
        held = pulp.lpSum(int(sizes[l, c]) * y[c, g, l] for l in range(num_layers) for c in clusters)
        prob += held >= experts // num_gpus
        prob += held <= -(-experts // num_gpus)
    return prob, y, z, t


def solve_ilp2(cluster_mass: np.ndarray, sizes: np.ndarray, cost: np.ndarray, mip: Mapping[str, Any],
               start: np.ndarray | None = None) -> tuple[np.ndarray | None, MipResult]:
    """GPU of every cluster ([L, C], None without a solution) and the solve record.

    start: a GPU per cluster [L, C] to start from (ignored by the solver if it breaks a constraint).
    """
    prob, y, z, t = build_ilp2(cluster_mass, sizes, cost)
    if start is not None:
        for (c, g, l), var in y.items():
            var.setInitialValue(float(start[l, c] == g))
        for (c1, g1, c2, g2, l), var in z.items():
            var.setInitialValue(float(start[l, c1] == g1 and start[l + 1, c2] == g2))
        for var, tail in zip(t, link_tails(cluster_mass, start, cost)):
            var.setInitialValue(float(tail))
    result = solve_mip(prob, **mip, warm_start=start is not None)
    if not result.has_solution:
        return None, result
    num_layers, num_clusters = sizes.shape
    gpus = range(len(cost))
    gpu_of = np.array([[max(gpus, key=lambda g: y[c, g, l].varValue or 0.0) for c in range(num_clusters)]
                       for l in range(num_layers)], dtype=np.int64)
    return gpu_of, result


def affinity_gpus(cluster_mass: np.ndarray, num_gpus: int) -> np.ndarray:
    """ILP2 fallback: cluster c of layer 0 on GPU c, later layers follow the affinity. [L, C]"""
    gpu_of = [np.arange(num_gpus)]
    for mass in cluster_mass:
        gpu_of.append(follow_affinity(mass, gpu_of[-1], num_gpus, capacity=1))
    return np.stack(gpu_of)


def _overall_status(results: list[MipResult], fell_back: bool) -> str:
    if fell_back:
        return "fallback"
    return "optimal" if all(r.status == "optimal" for r in results) else "feasible"


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


def cluster_layers(load: np.ndarray, num_gpus: int, slots_per_gpu: int, min_size: int, max_size: int,
                   mip: Mapping[str, Any]) -> tuple[np.ndarray, list[MipResult], list[str]]:
    """ILP1 on every layer (G clusters), started from (and falling back to) greedy's GPUs as clusters.

    load: [L, E]. Returns cluster_of [L, E], the ILP1 solve records and the fallback reasons.
    """
    num_layers, num_experts = load.shape
    greedy = greedy_phy2log(load, num_gpus, slots_per_gpu)
    cluster_of = np.zeros(load.shape, dtype=np.int64)
    results, fallbacks = [], []
    for layer in tqdm(range(num_layers), desc="moetuner ILP1", leave=False):
        # greedy holds each expert once: the last E slots of the sorted row are the experts' slots
        greedy_clusters = np.argsort(greedy[layer])[-num_experts:] // slots_per_gpu
        clusters, result = solve_ilp1(load[layer], num_gpus, min_size, max_size, mip, start=greedy_clusters)
        results.append(result)
        if clusters is None:
            fallbacks.append(f"ILP1 layer {layer}: {result.status}, greedy clusters used")
            clusters = greedy_clusters
        cluster_of[layer] = clusters
    return cluster_of, results, fallbacks


def place_clusters(cluster_mass: np.ndarray, sizes: np.ndarray, cost: np.ndarray, mip: Mapping[str, Any],
                   max_vars: int) -> tuple[np.ndarray, MipResult | None, list[str]]:
    """ILP2, started from (and falling back to) the affinity assignment.

    Returns gpu_of_cluster [L, C], the ILP2 solve record (None if not built) and fallback reasons.
    """
    affinity = affinity_gpus(cluster_mass, len(cost))
    needed = ilp2_size(cluster_mass, len(cost))
    if needed > max_vars:
        return affinity, None, [f"ILP2 needs {needed} variables > ilp2_max_vars={max_vars}; "
                                f"affinity assignment used"]
    gpu_of_cluster, result = solve_ilp2(cluster_mass, sizes, cost, mip, start=affinity)
    if gpu_of_cluster is None:
        return affinity, result, [f"ILP2: {result.status}, affinity assignment used"]
    return gpu_of_cluster, result, []


def solve_moetuner(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """ILP1 per layer, then ILP2 over all layers; objective = ILP2's, bound = ILP2's proven bound.

    options: max_nodes (per MIP, the work budget; MAX_NODES), seed (0), time_limit_s (per MIP, a safety
    cap; TIME_CAP_S), mip_solver (highs|cbc), gap_rel, equal_cluster_size, ilp2_max_vars (larger ILP2s
    are not built: affinity fallback), fill_replicas (copies of hot experts in slots the clusters leave
    empty).
    """
    start = time.perf_counter()
    num_gpus, num_experts = problem.num_gpus, problem.num_experts
    mip = {"mip_solver": str(options.get("mip_solver", "highs")),
           "time_limit_s": float(options.get("time_limit_s", TIME_CAP_S)),
           "gap_rel": float(options.get("gap_rel", 0.025)),
           "max_nodes": int(options.get("max_nodes", MAX_NODES)), "seed": int(options.get("seed", 0))}
    if options.get("equal_cluster_size", False):
        min_size, max_size = num_experts // num_gpus, -(-num_experts // num_gpus)
    else:
        min_size, max_size = int(num_experts >= num_gpus), problem.slots_per_gpu  # no empty cluster if E >= G
    cluster_of, ilp1, fallbacks = cluster_layers(problem.load, num_gpus, problem.slots_per_gpu, min_size, max_size, mip)
    transition = problem.transitions  # [L-1, E, E], weighted over the profile's domains
    cluster_mass = cluster_transitions(transition, cluster_of, num_gpus)
    sizes = np.stack([np.bincount(row, minlength=num_gpus) for row in cluster_of])
    cost = link_cost(problem.topology.bandwidth())
    gpu_of_cluster, ilp2, ilp2_fallbacks = place_clusters(cluster_mass, sizes, cost, mip,
                                                          int(options.get("ilp2_max_vars", 200_000)))
    fallbacks += ilp2_fallbacks
    gpu_of = np.take_along_axis(gpu_of_cluster, cluster_of, axis=1)
    results = ilp1 + ([ilp2] if ilp2 else [])
    return finish(
        problem, phy2log_from_gpus(gpu_of, num_gpus, problem.slots_per_gpu), "moetuner", start,
        status=_overall_status(results, bool(fallbacks)),
        budget_bound_by=budget_bound_by(results), max_nodes=mip["max_nodes"],
        mip_nodes=_sum_or_none([r.nodes for r in results]),
        objective=ilp2_objective(cluster_mass, gpu_of_cluster, cost),
        bound=ilp2.bound if ilp2 and ilp2.has_solution else None,
        fill=bool(options.get("fill_replicas", True)),
        objective_kind="ilp2_link_tail_sum",
        ilp1_objective=float(sum(ilp1_objective(p, c, num_gpus) for p, c in zip(problem.load, cluster_of))),
        ilp1_bound=_sum_or_none([r.bound for r in ilp1]),
        ilp1_seconds=float(sum(r.seconds for r in ilp1)),
        ilp2_seconds=ilp2.seconds if ilp2 else None,
        mip_solver=ilp1[0].solver if ilp1 else mip["mip_solver"],
        fallback_reasons=fallbacks,
    )
