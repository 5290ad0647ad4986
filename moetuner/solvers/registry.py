"""Solver names -> solver functions, and running one on a problem with its solve record.

Every solver is `solve_<name>(problem: PlacementProblem, options: Mapping) -> Placement` (conf/solver/<name>.yaml
holds its options); its module is imported on first use.

The names live in this one dict rather than as `_target_` keys in conf/solver/*.yaml for
`hydra.utils.instantiate`: code without a Hydra config looks solvers up by name (steptail's warm starts,
the online policies, the benchmarks), and would then have to read the YAML files to find a function;
instantiate also calls its target with the config's keys as keyword arguments, where every solver takes
(problem, options).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from moetuner.placement import Placement, gpu_loads
from moetuner.profiling.stats import imbalance
from moetuner.solvers.mip import relative_gap
from moetuner.solvers.problem import PlacementProblem, ProblemError

Solver = Callable[[PlacementProblem, Mapping[str, Any]], Placement]

SOLVERS: dict[str, str] = {
    "contiguous": "moetuner.solvers.baselines:solve_contiguous",
    "round_robin": "moetuner.solvers.baselines:solve_round_robin",
    "greedy": "moetuner.solvers.baselines:solve_greedy",
    "eplb": "moetuner.solvers.eplb:solve_eplb",
    "eplb_node_groups": "moetuner.solvers.eplb:solve_eplb_node_groups",
    "exflow": "moetuner.solvers.exflow:solve_exflow",
    "moetuner": "moetuner.solvers.moetuner_ilp:solve_moetuner",
    "partition": "moetuner.solvers.partition:solve_partition",
    "steptail": "moetuner.solvers.steptail:solve_steptail",
}
"""Solver name -> 'module:function' (imported on first use)."""
LOAD_ONLY_SOLVERS = ("contiguous", "round_robin", "greedy", "eplb")
"""Solvers that need expert loads alone, so can place from a load profile (`PlacementProblem.load_only`).
The others score co-activation (partition), transitions (exflow, moetuner) or token-level steps (steptail)."""


class UnknownSolverError(ValueError):
    """No solver of that name."""


def get_solver(name: str) -> Solver:
    """The solver function registered under `name`."""
    if name not in SOLVERS:
        raise UnknownSolverError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    module, func = SOLVERS[name].split(":")
    return getattr(importlib.import_module(module), func)


def check_solver_inputs(problem: PlacementProblem, solver: str) -> Solver:
    """The solver registered as `solver`, after checking the problem has the statistics it needs."""
    solver_fn = get_solver(solver)
    if problem.load_only and solver not in LOAD_ONLY_SOLVERS:
        raise ProblemError(f"solver {solver!r} needs token-level routing (co-activation, transitions or step "
                           f"scoring) and {problem.profile.source!r} is a load profile with expert loads only "
                           f"(no co-activation data); use one of {list(LOAD_ONLY_SOLVERS)}, or a routing trace")
    return solver_fn


def solve_placement(problem: PlacementProblem, solver: str, options: Mapping[str, Any]) -> Placement:
    """Run solver `solver` on `problem`; record the model (and its decoder layers, where the profile knows
    them), topology and replicas in the placement."""
    placement = check_solver_inputs(problem, solver)(problem, options)
    total = problem.profile.extra.get("num_hidden_layers")
    if total is not None:
        placement.extra.update(num_hidden_layers=int(total))
    placement.extra.update(num_experts=problem.num_experts, replicas=problem.replicas,
                           moe_layers=[int(x) for x in problem.profile.moe_layers],
                           topology=problem.topology.name, model=problem.profile.model,
                           source=problem.profile.source, dispatch=problem.dispatch, dataflow=problem.dataflow)
    if len(problem.domains) > 1:
        placement.extra.update(domains=[d.source for d in problem.domains], domain_weights=list(problem.weights),
                               robust=problem.robust)
    return placement


def placement_metrics(placement: Placement, load: np.ndarray) -> dict[str, float | None]:
    """Solve record plus profile tokens per GPU: max/mean/imbalance, each averaged over layers."""
    per_gpu = gpu_loads(placement.phy2log, load, placement.num_gpus)  # [L, G]
    mean = per_gpu.mean(1)
    return {
        "objective": placement.objective,
        "bound": placement.bound,
        "gap": relative_gap(placement.objective, placement.bound),
        "solve_seconds": placement.solve_seconds,
        "max_gpu_load": float(per_gpu.max(1).mean()),
        "mean_gpu_load": float(mean.mean()),
        "imbalance": float(imbalance(per_gpu).mean()),
    }
