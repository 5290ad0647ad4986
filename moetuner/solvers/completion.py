"""What every solver does last: fill the slots it left empty with hot replicas, and wrap the map as a Placement.

Solvers that place each expert once leave `replicas` (and any rounding) slots empty; `fill_hot_replicas`
gives every empty slot a copy of the expert with the most load per replica, on the lightest GPU.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moetuner.placement import Placement, gpu_loads
from moetuner.solvers.problem import PlacementProblem


def fill_hot_replicas(phy2log: np.ndarray, load: np.ndarray, num_gpus: int,
                      gpus_per_node: int | None = None) -> np.ndarray:
    """Fill every empty slot (-1) with a replica of a hot expert; the placed experts stay put.

    As EPLB: each extra copy goes to the expert with the largest load per copy; then the copies,
    heaviest first, go to the least-loaded GPU with room, preferring GPUs without that expert (and,
    with `gpus_per_node`, first the GPUs on the node of the expert's first copy).
    Returns a new [L, P] map; phy2log: [L, P], load: [L, E].
    """
    out = phy2log.copy()
    slots_per_gpu = out.shape[1] // num_gpus
    for layer, row in enumerate(out):
        counts = np.bincount(row[row >= 0], minlength=load.shape[1])
        extra = []
        for _ in range(int((row < 0).sum())):
            expert = int(np.argmax(load[layer] / np.maximum(counts, 1)))
            counts[expert] += 1
            extra.append(expert)
        per_copy = load[layer] / np.maximum(counts, 1)
        grid = row.reshape(num_gpus, slots_per_gpu)  # a view: writes go to `out`
        per_gpu = np.where(grid >= 0, per_copy[np.maximum(grid, 0)], 0.0).sum(1)
        for expert in sorted(extra, key=lambda e: -per_copy[e]):
            free = (grid < 0).any(1)
            fresh = free & ~(grid == expert).any(1)
            allowed = fresh if fresh.any() else free
            if gpus_per_node is not None and (grid == expert).any():
                node = np.flatnonzero((grid == expert).any(1))[0] // gpus_per_node
                near = allowed & (np.arange(num_gpus) // gpus_per_node == node)
                allowed = near if near.any() else allowed
            gpu = int(np.argmin(np.where(allowed, per_gpu, np.inf)))
            grid[gpu, int(np.argmax(grid[gpu] < 0))] = expert
            per_gpu[gpu] += per_copy[expert]
    return out


def finish(problem: PlacementProblem, phy2log: np.ndarray, solver: str, start: float,
           status: str = "heuristic", objective: float | None = None, bound: float | None = None,
           fill: bool = True, **extra: Any) -> Placement:
    """Fill empty slots with hot replicas (if `fill`) and wrap the map as a validated Placement.

    objective defaults to the balance objective: sum over layers of the most loaded GPU's tokens.
    """
    if fill:
        phy2log = fill_hot_replicas(phy2log, problem.load, problem.num_gpus)
    if objective is None:
        objective = float(gpu_loads(phy2log, problem.load, problem.num_gpus).max(1).sum())
    placement = Placement(phy2log=phy2log, num_gpus=problem.num_gpus, num_nodes=problem.topology.nodes,
                          solver=solver, objective=objective, bound=bound, solve_seconds=time.perf_counter() - start,
                          status=status, extra=extra)
    return placement.validate(problem.num_experts)
