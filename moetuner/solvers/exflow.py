"""Affinity placement in the style of ExFlow: keep consecutive-layer routes on one GPU.

Layer 0 is contiguous; each next layer is an optimal assignment (Hungarian) of its experts to GPUs
with ceil(E/G) experts per GPU, maximising the transition mass R[l] that stays on a GPU.
Engine setting reproduced: none (no engine ships an affinity placement); it follows ExFlow's idea
(inter-layer expert affinity), not its code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from moetuner.solvers.completion import finish
from moetuner.placement import Placement
from moetuner.solvers.problem import PlacementProblem


def assign_to_gpus(score: np.ndarray, capacity: int) -> np.ndarray:
    """Item -> GPU maximising the summed score, at most `capacity` items per GPU. [n, G] -> int [n]"""
    num_items, num_gpus = score.shape
    assert num_items <= num_gpus * capacity, "not enough room for every item"
    rows, cols = linear_sum_assignment(np.repeat(score, capacity, axis=1), maximize=True)
    gpu = np.empty(num_items, dtype=np.int64)
    gpu[rows] = cols // capacity
    return gpu


def follow_affinity(transition: np.ndarray, gpu_of_prev: np.ndarray, num_gpus: int, capacity: int) -> np.ndarray:
    """GPU of each item of the next layer, keeping most transition mass on-GPU.

    transition: [n_prev, n_next] mass from previous items to next items; gpu_of_prev: [n_prev].
    """
    on_gpu = np.eye(num_gpus)[gpu_of_prev]  # [n_prev, G]
    return assign_to_gpus(transition.T @ on_gpu, capacity)


def phy2log_from_gpus(gpu_of: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """[L, E] GPU of every expert -> [L, P] map, experts in id order on each GPU, rest empty (-1)."""
    num_layers, num_experts = gpu_of.shape
    phy2log = -np.ones((num_layers, num_gpus * slots_per_gpu), dtype=np.int64)
    for layer in range(num_layers):
        for gpu in range(num_gpus):
            experts = np.flatnonzero(gpu_of[layer] == gpu)
            assert len(experts) <= slots_per_gpu, "more experts than slots on a GPU"
            phy2log[layer, gpu * slots_per_gpu: gpu * slots_per_gpu + len(experts)] = experts
    return phy2log


def cross_gpu_mass(transition: np.ndarray, gpu_of: np.ndarray) -> float:
    """Transition mass whose two experts sit on different GPUs. R: [L-1, E, E], gpu_of: [L, E]"""
    differ = gpu_of[:-1, :, None] != gpu_of[1:, None, :]
    return float((transition * differ).sum())


def exflow_gpus(transition: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """GPU of every expert, layer by layer along the affinity. R: [L-1, E, E] -> int [L, E]"""
    capacity = -(-num_experts // num_gpus)
    gpu_of = [np.arange(num_experts) // capacity]
    for layer_transition in transition:
        gpu_of.append(follow_affinity(layer_transition, gpu_of[-1], num_gpus, capacity))
    return np.stack(gpu_of)


def solve_exflow(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """ExFlow-style affinity placement; objective = cross-GPU transition mass (lower is better)."""
    start = time.perf_counter()
    transition = problem.transitions  # [L-1, E, E], weighted over the profile's domains
    gpu_of = exflow_gpus(transition, problem.num_experts, problem.num_gpus)
    phy2log = phy2log_from_gpus(gpu_of, problem.num_gpus, problem.slots_per_gpu)
    return finish(problem, phy2log, "exflow", start, objective=cross_gpu_mass(transition, gpu_of),
                  objective_kind="cross_gpu_transition_mass")
