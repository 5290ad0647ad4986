"""PuLP helpers: solve a MIP with HiGHS (CBC as fallback) and report honestly what was proven.

PuLP reports a time-limited solution as "Optimal" for both HiGHS and CBC; the truth is in
`prob.sol_status` (1 proven optimal within the gap tolerance, 2 feasible only).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import pulp

log = logging.getLogger(__name__)

MIP_SOLVERS = ("highs", "cbc")


class MipError(ValueError):
    """A MIP option is invalid."""


@dataclass(frozen=True)
class MipResult:
    """What a MIP solve proved: status optimal | time_limit | infeasible | no_solution."""

    status: str
    objective: float | None  # value of the incumbent, None without one
    bound: float | None  # proven lower bound (minimisation), None if the solver gives none
    seconds: float
    solver: str  # the solver that actually ran

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "time_limit")

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective, self.bound)


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """(objective - bound) / max(|objective|, 1e-9), None without both; 0 when proven optimal."""
    if objective is None or bound is None:
        return None
    return max(0.0, objective - bound) / max(abs(objective), 1e-9)


class WarmHiGHS(pulp.HiGHS):
    """PuLP's highspy HiGHS, started from the variables' current values (PuLP's own ignores them)."""

    def callSolver(self, lp: pulp.LpProblem) -> None:
        import highspy

        start = highspy.HighsSolution()
        start.col_value = [float(v.varValue or 0.0) for v in lp.variables()]  # PuLP's column order
        lp.solverModel.setSolution(start)
        super().callSolver(lp)


def make_solver(mip_solver: str, time_limit_s: float, gap_rel: float, warm_start: bool = False) -> pulp.LpSolver:
    """A PuLP solver: HiGHS (default), or CBC when asked for or when HiGHS is not installed.

    warm_start: start from the variables' current values (set with `setInitialValue`).
    """
    if mip_solver not in MIP_SOLVERS:
        raise MipError(f"mip_solver={mip_solver!r} is not supported; use one of {list(MIP_SOLVERS)}")
    if time_limit_s <= 0:
        raise MipError(f"time_limit_s must be positive, got {time_limit_s}")
    if mip_solver == "highs":
        solver = (WarmHiGHS if warm_start else pulp.HiGHS)(msg=False, timeLimit=time_limit_s, gapRel=gap_rel)
        if solver.available():
            return solver
        log.warning("HiGHS (highspy) is not available; falling back to CBC")
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC; it is the only CBC here
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, warmStart=warm_start)


def _highs_bound(prob: pulp.LpProblem) -> float | None:
    model = getattr(prob, "solverModel", None)
    if model is None:
        return None
    bound = float(model.getInfo().mip_dual_bound)
    return bound if abs(bound) < float("inf") else None


def solve_mip(prob: pulp.LpProblem, mip_solver: str = "highs", time_limit_s: float = 60.0,
              gap_rel: float = 0.0, warm_start: bool = False) -> MipResult:
    """Solve a minimisation `prob` in place; the variables hold the incumbent if there is one."""
    assert prob.sense == pulp.LpMinimize, "solve_mip expects a minimisation problem"
    solver = make_solver(mip_solver, time_limit_s, gap_rel, warm_start)
    start = time.perf_counter()
    prob.solve(solver)
    seconds = time.perf_counter() - start
    name = "highs" if isinstance(solver, pulp.HiGHS) else "cbc"
    if prob.sol_status == pulp.LpSolutionInfeasible:
        return MipResult("infeasible", None, None, seconds, name)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return MipResult("no_solution", None, None, seconds, name)
    objective = float(pulp.value(prob.objective) or 0.0)
    if prob.sol_status == pulp.LpSolutionOptimal:
        bound = _highs_bound(prob) if name == "highs" else objective
        return MipResult("optimal", objective, objective if bound is None else bound, seconds, name)
    return MipResult("time_limit", objective, _highs_bound(prob) if name == "highs" else None, seconds, name)
