"""What every placement solver receives, and the registry that maps solver names to functions."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from moetuner.placement.layout import Placement
from moetuner.profiling.stats import expert_load
from moetuner.topology import Topology, TopologyError
from moetuner.trace import Trace


@dataclass(frozen=True)
class PlacementProblem:
    """Place the experts of `profile`'s model on `topology`, `replicas` extra slots per GPU per layer."""

    profile: Trace  # the routing the placement is computed from (never the evaluation tokens)
    topology: Topology
    replicas: int = 0
    step_tokens: int = 4096  # tokens per serving step, for per-step objectives

    def __post_init__(self) -> None:
        self.topology.check_fits(self.profile.num_experts)
        self.topology.slots_per_gpu(self.profile.num_experts, self.replicas)  # raises if over the cap

    @property
    def num_layers(self) -> int:
        return self.profile.num_layers

    @property
    def num_experts(self) -> int:
        return self.profile.num_experts

    @property
    def num_gpus(self) -> int:
        return self.topology.num_gpus

    @property
    def slots_per_gpu(self) -> int:
        """S = ceil(E / G) + replicas."""
        return self.topology.slots_per_gpu(self.num_experts, self.replicas)

    @property
    def num_slots(self) -> int:
        """P = G * S physical slots per layer."""
        return self.num_gpus * self.slots_per_gpu

    @cached_property
    def load(self) -> np.ndarray:
        """Tokens routed to each expert in the profile. float [L, E]"""
        return expert_load(self.profile.topk_ids, self.num_experts).astype(float)


Solver = Callable[[PlacementProblem, Mapping[str, Any]], Placement]

SOLVERS: dict[str, str] = {
    "contiguous": "moetuner.placement.baselines:solve_contiguous",
    "round_robin": "moetuner.placement.baselines:solve_round_robin",
    "greedy": "moetuner.placement.baselines:solve_greedy",
    "eplb": "moetuner.placement.eplb:solve_eplb",
    "exflow": "moetuner.placement.exflow:solve_exflow",
    "moetuner": "moetuner.placement.moetuner_ilp:solve_moetuner",
    "steptail": "moetuner.placement.steptail:solve_steptail",
}
"""Solver name -> 'module:function' (imported on first use)."""


class UnknownSolverError(ValueError):
    """No solver of that name."""


def get_solver(name: str) -> Solver:
    """The solver function registered under `name`."""
    if name not in SOLVERS:
        raise UnknownSolverError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    module, func = SOLVERS[name].split(":")
    return getattr(importlib.import_module(module), func)


__all__ = ["PlacementProblem", "SOLVERS", "Solver", "get_solver", "TopologyError", "UnknownSolverError"]
