"""Co-activation partition: balanced expert groups per node and per GPU that keep co-activated experts together.

Per layer, experts are split over nodes, then each node's experts over its GPUs, each split a balanced
graph partition: parts of equal size (ceil(n / parts)), part loads within `tolerance` of the mean
(or no worse than the load-balanced start), maximising the co-activation mass C (tokens that chose
both experts, profile statistic C [L, E, E]) kept inside a part. A token whose experts share a node
crosses the inter-node link once less (hierarchical dispatch); experts sharing a GPU need one token
copy less (dispatch-combine dedups per GPU). Start: heaviest expert first onto the lightest part with
room (LPT); refinement: Kernighan-Lin style pair swaps, best gain first, while one improves.
Slots beyond the experts get hot replicas (`fill_hot_replicas`) on the node of the expert's first copy
where it has room, so replicas keep the node grouping.
Engine setting reproduced: none (ours; steptail's warm start).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from moetuner.solvers.completion import fill_hot_replicas, finish
from moetuner.placement import Placement
from moetuner.solvers.problem import PlacementProblem


def lpt_parts(load: np.ndarray, parts: int) -> np.ndarray:
    """Heaviest item first onto the lightest part with room (ceil(n / parts) each). load [n] -> part [n]"""
    capacity = -(-len(load) // parts)
    part = np.zeros(len(load), dtype=np.int64)
    total, used = np.zeros(parts), np.zeros(parts, dtype=np.int64)
    for item in np.argsort(-load, kind="stable"):
        p = int(np.argmin(np.where(used < capacity, total, np.inf)))
        part[item], total[p], used[p] = p, total[p] + load[item], used[p] + 1
    return part


def cut_mass(coact: np.ndarray, part: np.ndarray) -> float:
    """Co-activation mass between items of different parts (each pair once). coact [n, n], part [n]"""
    return float(np.triu(coact * (part[:, None] != part[None, :]), 1).sum())


def balanced_partition(load: np.ndarray, coact: np.ndarray, parts: int, tolerance: float = 0.05,
                       max_rounds: int | None = None, deadline: float | None = None) -> np.ndarray:
    """Equal-size parts with balanced load that keep co-activation inside parts. load [n], coact [n, n] -> part [n]

    Swaps only: sizes stay those of the LPT start. A swap is allowed when both parts end at most at
    max((1 + tolerance) * mean part load, the start's largest part load). Each round applies the best
    improving swap, then the best of the remaining ones between parts no swap of the round touched
    (their gains do not change), until a round finds none, after `max_rounds` (default n) or at
    `deadline` (time.perf_counter() seconds).
    """
    part = lpt_parts(load, parts)
    if parts <= 1 or len(load) <= 1:
        return part
    load, coact = load.astype(float), coact.astype(float)
    total = np.bincount(part, weights=load, minlength=parts)
    cap = max((1 + tolerance) * total.mean(), float(total.max())) + 1e-9
    n = len(load)
    mass = coact @ np.eye(parts)[part]  # [n, parts] co-activation of each item with each part
    delta = load[None, :] - load[:, None]  # [a, b]: the part of a gains load[b] - load[a]
    for _ in range(max_rounds if max_rounds is not None else n):
        if deadline is not None and time.perf_counter() > deadline:
            break
        own = mass[np.arange(n), part]
        # gain of swapping a (part i) with b (part j): M[a,j] - M[a,i] + M[b,i] - M[b,j] - 2 C[a,b]
        to_other = mass[:, part]  # [a, b] = M[a, part of b]
        gain = to_other - own[:, None] + to_other.T - own[None, :] - 2 * coact
        level = total[part]
        ok = (part[:, None] < part[None, :]) & (level[:, None] + delta <= cap) & (level[None, :] - delta <= cap)
        pairs = np.flatnonzero(ok & (gain > 1e-9))
        if not len(pairs):
            break
        touched = np.zeros(parts, dtype=bool)
        for flat in pairs[np.argsort(-gain.ravel()[pairs], kind="stable")]:
            a, b = divmod(int(flat), n)
            i, j = part[a], part[b]
            if touched[i] or touched[j]:
                continue
            touched[i] = touched[j] = True
            total[i] += load[b] - load[a]
            total[j] += load[a] - load[b]
            mass[:, i] += coact[:, b] - coact[:, a]
            mass[:, j] += coact[:, a] - coact[:, b]
            part[a], part[b] = j, i
            if touched.sum() >= parts - 1:
                break
    return part


def partition_row(load: np.ndarray, coact: np.ndarray, nodes: int, gpus_per_node: int, slots_per_gpu: int,
                  tolerance: float, deadline: float | None = None) -> np.ndarray:
    """One layer: experts to nodes, then to GPUs, each a balanced partition. load [E], coact [E, E] -> [P]

    nodes=1 with gpus_per_node=G partitions straight onto the G GPUs."""
    num_gpus = nodes * gpus_per_node
    row = -np.ones(num_gpus * slots_per_gpu, dtype=np.int64)
    node = balanced_partition(load, coact, nodes, tolerance, deadline=deadline)
    for n in range(nodes):
        members = np.flatnonzero(node == n)
        gpu = balanced_partition(load[members], coact[np.ix_(members, members)], gpus_per_node, tolerance,
                                 deadline=deadline)
        for g in range(gpus_per_node):
            mine = members[gpu == g]  # ceil(ceil(E / nodes) / gpus_per_node) = ceil(E / G) <= slots_per_gpu
            first = (n * gpus_per_node + g) * slots_per_gpu
            row[first:first + len(mine)] = mine
    return row


def partition_phy2log(load: np.ndarray, coact: np.ndarray, nodes: int, gpus_per_node: int, slots_per_gpu: int,
                      tolerance: float = 0.05, deadline: float | None = None) -> np.ndarray:
    """Every layer partitioned (`partition_row`): experts to nodes, then to each node's GPUs. [L, P]

    load: [L, E]; coact: [L, E, E]; P = nodes * gpus_per_node * slots_per_gpu, slots beyond the experts
    empty (-1). deadline (time.perf_counter() seconds, None: none): each layer's swap search gets an equal
    share of what is left of it.
    """
    num_layers, num_experts = load.shape
    assert coact.shape == (num_layers, num_experts, num_experts), "coact must be [L, E, E] like load [L, E]"
    assert slots_per_gpu * nodes * gpus_per_node >= num_experts, "not enough slots for every expert"
    rows = []
    for layer in range(num_layers):
        layer_deadline = None if deadline is None else \
            time.perf_counter() + (deadline - time.perf_counter()) / (num_layers - layer)
        rows.append(partition_row(load[layer], coact[layer], nodes, gpus_per_node, slots_per_gpu, tolerance,
                                  layer_deadline))
    return np.stack(rows)


def node_cut_coactivation(phy2log: np.ndarray, coact: np.ndarray, gpus_per_node: int, slots_per_gpu: int) -> float:
    """Co-activation mass between experts on different nodes, summed over layers.

    phy2log: [L, P], each expert in one slot, the other slots empty (-1), as before replicas; coact: [L, E, E].
    """
    num_experts = coact.shape[1]
    assert all((np.bincount(row[row >= 0], minlength=num_experts) == 1).all() for row in phy2log), \
        "every expert in exactly one slot"
    node_of = np.arange(phy2log.shape[1] // slots_per_gpu) // gpus_per_node
    cut = 0.0
    for layer, row in enumerate(phy2log):
        expert_node = np.zeros(num_experts, dtype=np.int64)
        placed = row >= 0
        expert_node[row[placed]] = node_of[np.flatnonzero(placed) // slots_per_gpu]
        cut += cut_mass(coact[layer], expert_node)
    return cut


def solve_partition(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """Co-activation partition per layer (module docstring); objective = the balance objective,
    `node_cut_coactivation` = co-activation mass between experts on different nodes (summed over layers).

    options: tolerance (0.05): allowed part load above the mean, as a fraction; by_node (true): split
    over nodes first (false: straight over the GPUs); near_replicas (true): replicas on the node of
    the expert's first copy where it has room; time_limit_s (null: none): the swap search stops
    (layer by layer, an equal share each) when it is spent; the LPT start is always completed.
    """
    start = time.perf_counter()
    tolerance = float(options.get("tolerance", 0.05))
    topo = problem.topology
    by_node, near = bool(options.get("by_node", True)), bool(options.get("near_replicas", True))
    nodes, per_node = (topo.nodes, topo.gpus_per_node) if by_node else (1, problem.num_gpus)
    limit = options.get("time_limit_s")
    deadline = None if limit is None else start + float(limit)
    phy2log = partition_phy2log(problem.load, problem.coactivation, nodes, per_node, problem.slots_per_gpu,
                                tolerance, deadline)
    cut = node_cut_coactivation(phy2log, problem.coactivation, topo.gpus_per_node, problem.slots_per_gpu)
    phy2log = fill_hot_replicas(phy2log, problem.load, problem.num_gpus, topo.gpus_per_node if near else None)
    return finish(problem, phy2log, "partition", start, node_cut_coactivation=cut, tolerance=tolerance)
