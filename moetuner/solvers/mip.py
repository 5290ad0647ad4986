"""PuLP helpers: solve a MIP with HiGHS (CBC as fallback) and report honestly what was proven.

PuLP reports a time-limited solution as "Optimal" for both HiGHS and CBC; the truth is in
`prob.sol_status` (1 proven optimal within the gap tolerance, 2 feasible only).

The budget is work: `max_nodes` branch-and-bound nodes per MIP, one thread and a fixed `seed`. HiGHS
is deterministic for identical input and options on one thread, so the same MIP gives the same
incumbent on any machine and at any load. `time_limit_s` is only a safety cap; `budget_bound_by` says
what stopped a solve: `none` (proven within the gap), `nodes` (the node budget) or `time` (the cap: the
result then depends on the machine's speed).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import pulp

log = logging.getLogger(__name__)

MIP_SOLVERS = ("highs", "cbc")
MAX_NODES = 5000
"""Default node budget per MIP."""
TIME_CAP_S = 600.0
"""Default safety cap per MIP (seconds)."""


class MipError(ValueError):
    """A MIP option is invalid."""


@dataclass(frozen=True)
class MipResult:
    """What a MIP solve proved: status optimal | feasible (a limit stopped it) | infeasible | no_solution."""

    status: str
    objective: float | None  # value of the incumbent, None without one
    bound: float | None  # proven lower bound (minimisation), None if the solver gives none
    seconds: float
    solver: str  # the solver that actually ran
    bound_by: str = "none"  # what stopped the search: none (proven within the gap) | nodes | time
    nodes: int | None = None  # branch-and-bound nodes explored (HiGHS), None if the solver does not say

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "feasible")

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective, self.bound)


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """(objective - bound) / max(|objective|, 1e-9), None without both; 0 when proven optimal."""
    if objective is None or bound is None:
        return None
    return max(0.0, objective - bound) / max(abs(objective), 1e-9)


class _NodeLimitSeenAsIterationLimit:
    """A HiGHS model whose status reads kIterationLimit where it is kSolutionLimit (the node budget), a
    status PuLP 3.3 does not map; everything else is the model's."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def getModelStatus(self) -> Any:  # noqa: N802 - highspy's name
        return highspy_status("kIterationLimit")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def highspy_status(name: str) -> Any:
    import highspy

    return getattr(highspy.HighsModelStatus, name)


class BudgetHiGHS(pulp.HiGHS):
    """PuLP's highspy HiGHS that also reads a solve stopped by `mip_max_nodes` (incumbent kept)."""

    def callSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 - PuLP's name
        import highspy

        # HiGHS keeps one thread pool per process, sized by the first run: without a reset, threads=1
        # after another HiGHS run in this process (the lp dispatch's) fails the solve
        highspy.Highs.resetGlobalScheduler(True)
        super().callSolver(lp)

    def findSolutionValues(self, lp: pulp.LpProblem) -> Any:  # noqa: N802 - PuLP's name
        model = lp.solverModel
        if model.getModelStatus() != highspy_status("kSolutionLimit"):
            return super().findSolutionValues(lp)
        lp.solverModel = _NodeLimitSeenAsIterationLimit(model)
        try:
            return super().findSolutionValues(lp)
        finally:
            lp.solverModel = model


class WarmHiGHS(BudgetHiGHS):
    """BudgetHiGHS started from the variables' current values (PuLP's own ignores them)."""

    def callSolver(self, lp: pulp.LpProblem) -> None:
        import highspy

        start = highspy.HighsSolution()
        start.col_value = [float(v.varValue or 0.0) for v in lp.variables()]  # PuLP's column order
        lp.solverModel.setSolution(start)
        super().callSolver(lp)


def make_solver(mip_solver: str, time_limit_s: float, gap_rel: float, warm_start: bool = False,
                max_nodes: int = MAX_NODES, seed: int = 0) -> pulp.LpSolver:
    """A PuLP solver on one thread with a node budget and a seed: HiGHS (default), or CBC when asked for
    or when HiGHS is not installed.

    warm_start: start from the variables' current values (set with `setInitialValue`).
    """
    if mip_solver not in MIP_SOLVERS:
        raise MipError(f"mip_solver={mip_solver!r} is not supported; use one of {list(MIP_SOLVERS)}")
    if time_limit_s <= 0:
        raise MipError(f"time_limit_s must be positive, got {time_limit_s}")
    if max_nodes < 0:
        raise MipError(f"max_nodes (the node budget per MIP; 0: no branch-and-bound node, the warm start or "
                       f"what presolve finds) must be >= 0, got {max_nodes}")
    if mip_solver == "highs":
        solver = (WarmHiGHS if warm_start else BudgetHiGHS)(msg=False, timeLimit=time_limit_s, gapRel=gap_rel,
                                                           threads=1, mip_max_nodes=int(max_nodes),
                                                           random_seed=int(seed))
        if solver.available():
            return solver
        log.warning("HiGHS (highspy) is not available; falling back to CBC")
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC; it is the only CBC here
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, warmStart=warm_start,
                                 threads=1, maxNodes=int(max_nodes), options=[f"randomSeed {int(seed)}"])


def _highs_stop(prob: pulp.LpProblem) -> tuple[str, int | None]:
    """(what stopped HiGHS: none | nodes | time, nodes explored) from its model status and info."""
    model = prob.solverModel
    status = model.getModelStatus()
    stopped = {highspy_status("kTimeLimit"): "time", highspy_status("kSolutionLimit"): "nodes",
               highspy_status("kIterationLimit"): "nodes"}.get(status, "none")
    return stopped, int(model.getInfo().mip_node_count)


def _highs_bound(prob: pulp.LpProblem) -> float | None:
    model = getattr(prob, "solverModel", None)
    if model is None:
        return None
    bound = float(model.getInfo().mip_dual_bound)
    return bound if abs(bound) < float("inf") else None


def solve_mip(prob: pulp.LpProblem, mip_solver: str = "highs", time_limit_s: float = TIME_CAP_S,
              gap_rel: float = 0.0, warm_start: bool = False, max_nodes: int = MAX_NODES,
              seed: int = 0) -> MipResult:
    """Solve a minimisation `prob` in place within `max_nodes` nodes (`time_limit_s`: a safety cap); the
    variables hold the incumbent if there is one."""
    assert prob.sense == pulp.LpMinimize, "solve_mip expects a minimisation problem"
    solver = make_solver(mip_solver, time_limit_s, gap_rel, warm_start, max_nodes, seed)
    start = time.perf_counter()
    prob.solve(solver)
    seconds = time.perf_counter() - start
    name = "highs" if isinstance(solver, pulp.HiGHS) else "cbc"
    # CBC through PuLP does not say what stopped it: a solve that ran to the cap is taken as time-bound
    stopped, nodes = _highs_stop(prob) if name == "highs" else ("time" if seconds >= time_limit_s else "nodes", None)
    if prob.sol_status == pulp.LpSolutionInfeasible:
        return MipResult("infeasible", None, None, seconds, name, "none", nodes)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return MipResult("no_solution", None, None, seconds, name, stopped, nodes)
    objective = float(pulp.value(prob.objective) or 0.0)
    if prob.sol_status == pulp.LpSolutionOptimal:
        bound = _highs_bound(prob) if name == "highs" else objective
        return MipResult("optimal", objective, objective if bound is None else bound, seconds, name, "none", nodes)
    return MipResult("feasible", objective, _highs_bound(prob) if name == "highs" else None, seconds, name,
                     stopped, nodes)


def budget_bound_by(results: list[MipResult]) -> str:
    """What stopped the MIPs: time if the safety cap stopped any, else nodes if the node budget stopped
    any, else none (all proven within the gap)."""
    stops = {r.bound_by for r in results}
    return next((stop for stop in ("time", "nodes") if stop in stops), "none")
