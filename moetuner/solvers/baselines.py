"""Baseline placements: contiguous (Megatron), round-robin (vLLM), greedy (heaviest expert to the lightest GPU).

Engine settings reproduced (with replicas=0; extra slots here get hot replicas, see `finish`):
- contiguous: SGLang 0.5.23's default `--init-expert-location trivial`
  (`srt/eplb/expert_location.py`, `ExpertLocationMetadata.init_trivial`: physical slot p holds expert
  p % E, GPU r the slots [r*S, (r+1)*S)); vLLM's default `--expert-placement-strategy linear`
  (`vllm/model_executor/layers/fused_moe/layer.py`, `determine_expert_map`); Megatron's expert-parallel
  split (rank r holds experts [r*E/G, (r+1)*E/G)).
- round_robin: vLLM's `--expert-placement-strategy round_robin` (`determine_expert_map`: expert e on
  rank e % G).
- greedy: no engine's setting; the longest-processing-time heuristic on the profile load, a reference
  between the load-blind layouts and EPLB.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from moetuner.placement import Placement, contiguous_phy2log
from moetuner.solvers.completion import finish
from moetuner.solvers.problem import PlacementProblem


def _static_layout(problem: PlacementProblem, layout: Callable[[int, int, int, int], np.ndarray],
                   solver: str) -> Placement:
    """A load-independent layout(L, E, G, S) -> [L, P], extra slots filled with hot replicas."""
    start = time.perf_counter()
    phy2log = layout(problem.num_layers, problem.num_experts, problem.num_gpus, problem.slots_per_gpu)
    return finish(problem, phy2log, solver, start)


def solve_contiguous(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """Megatron/DeepSpeed default: expert e on GPU e // ceil(E/G)."""
    return _static_layout(problem, contiguous_phy2log, "contiguous")


def round_robin_phy2log(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """vLLM's round_robin layout: expert e on GPU e % G, extra slots empty (-1). [L, P]"""
    row = -np.ones(num_gpus * slots_per_gpu, dtype=np.int64)
    for e in range(num_experts):
        row[(e % num_gpus) * slots_per_gpu + e // num_gpus] = e
    return np.tile(row, (num_layers, 1))


def solve_round_robin(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """vLLM's other initial layout: expert e on GPU e % G."""
    return _static_layout(problem, round_robin_phy2log, "round_robin")


def greedy_phy2log(load: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Per layer, heaviest expert first onto the lightest GPU with a free slot among ceil(E/G). [L, P]

    load: [L, E]. Slots beyond ceil(E/G) per GPU stay empty (-1).
    """
    num_layers, num_experts = load.shape
    capacity = -(-num_experts // num_gpus)
    assert slots_per_gpu >= capacity, "slots_per_gpu must hold ceil(E/G) experts"
    phy2log = -np.ones((num_layers, num_gpus * slots_per_gpu), dtype=np.int64)
    for layer in range(num_layers):
        gpu_load = np.zeros(num_gpus)
        used = np.zeros(num_gpus, dtype=np.int64)
        for e in np.argsort(-load[layer], kind="stable"):
            gpu = int(np.argmin(np.where(used < capacity, gpu_load, np.inf)))
            phy2log[layer, gpu * slots_per_gpu + used[gpu]] = e
            gpu_load[gpu] += load[layer, e]
            used[gpu] += 1
    return phy2log


def solve_greedy(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """Heaviest expert to the lightest GPU with a free slot, per layer, on the profile load."""
    start = time.perf_counter()
    phy2log = greedy_phy2log(problem.load, problem.num_gpus, problem.slots_per_gpu)
    return finish(problem, phy2log, "greedy", start)
