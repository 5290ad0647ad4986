"""Solver names -> solver functions and what each solver reads; running one on a problem with its solve record.

Every solver is `solve_<name>(problem: PlacementProblem, options: Mapping) -> Placement` (conf/solver/<name>.yaml
holds its options); its module is imported on first use. Each entry of SOLVERS also says what the solver
reads and honours (`SolverInfo`); the online policies, steptail's warm starts and the benchmarks derive
their lists from these attributes (`solver_names`), so adding a solver is one entry here plus its
conf/solver/<name>.yaml.

The names live in this one dict rather than as `_target_` keys in conf/solver/*.yaml for
`hydra.utils.instantiate`: code without a Hydra config looks solvers up by name (steptail's warm starts,
the online policies, the benchmarks), and would then have to read the YAML files to find a function;
instantiate also calls its target with the config's keys as keyword arguments, where every solver takes
(problem, options).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from moetuner.placement import Placement, gpu_loads
from moetuner.profiling.stats import imbalance
from moetuner.solvers.mip import relative_gap
from moetuner.solvers.problem import PlacementProblem, ProblemError

Solver = Callable[[PlacementProblem, Mapping[str, Any]], Placement]


@dataclass(frozen=True)
class SolverInfo:
    """One registry entry: where the solver lives and what it reads and honours."""

    target: str  # 'module:function', imported on first use
    load_only: bool = False  # reads PlacementProblem.load (tokens per expert), shapes and topology, never the
    #                          tokens: an engine's load counters are enough (the online policies pass them)
    warm_start: bool = False  # a candidate start of steptail's search (fast, reads no dispatch)
    time_budgeted: bool = False  # honours options["time_limit_s"] (for steptail and the MIPs only a safety cap
    #                              beside their work budget; when it binds, the placement says budget_bound_by)
    per_dispatch: bool = False  # reads the problem's dispatch and dataflow: one placement per dispatch


SOLVERS: dict[str, SolverInfo] = {
    "eplb": SolverInfo("moetuner.solvers.eplb:solve_eplb", load_only=True, warm_start=True),
    "greedy": SolverInfo("moetuner.solvers.baselines:solve_greedy", load_only=True, warm_start=True),
    "partition": SolverInfo("moetuner.solvers.partition:solve_partition", warm_start=True, time_budgeted=True),
    "exflow": SolverInfo("moetuner.solvers.exflow:solve_exflow", warm_start=True),
    "round_robin": SolverInfo("moetuner.solvers.baselines:solve_round_robin", load_only=True, warm_start=True),
    "contiguous": SolverInfo("moetuner.solvers.baselines:solve_contiguous", load_only=True, warm_start=True),
    "moetuner": SolverInfo("moetuner.solvers.moetuner_ilp:solve_moetuner", time_budgeted=True),
    "steptail": SolverInfo("moetuner.solvers.steptail:solve_steptail", time_budgeted=True, per_dispatch=True),
    "metro": SolverInfo("moetuner.solvers.metro:solve_metro", time_budgeted=True),
    "eplb_node_groups": SolverInfo("moetuner.solvers.eplb:solve_eplb_node_groups", load_only=True),
}
"""Solver name -> SolverInfo. The order is the order of `solver_names` (steptail tries its warm starts in
it and keeps the earlier one of two equally good rows)."""

_ATTRIBUTES = tuple(f.name for f in fields(SolverInfo) if isinstance(f.default, bool))


def solver_names(**attributes: bool) -> tuple[str, ...]:
    """The registered solvers whose attributes equal `attributes`, in registry order.

    solver_names(load_only=True) -> ('eplb', 'greedy', 'round_robin', 'contiguous')"""
    unknown = sorted(set(attributes) - set(_ATTRIBUTES))
    assert not unknown, f"unknown solver attribute(s) {unknown}; SolverInfo has {list(_ATTRIBUTES)}"
    return tuple(name for name, info in SOLVERS.items()
                 if all(getattr(info, key) == value for key, value in attributes.items()))

LOAD_ONLY_SOLVERS = solver_names(load_only=True)
"""Solvers that need expert loads alone, so can place from a load profile (`PlacementProblem.load_only`).
The others score co-activation (partition), transitions (exflow, moetuner) or token-level steps (steptail)."""


class UnknownSolverError(ValueError):
    """No solver of that name."""


def solver_info(name: str) -> SolverInfo:
    """The registry entry of solver `name`."""
    if name not in SOLVERS:
        raise UnknownSolverError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def get_solver(name: str) -> Solver:
    """The solver function registered under `name`."""
    module, func = solver_info(name).target.split(":")
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
