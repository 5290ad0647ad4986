"""steptail: valid output, never worse than its warm start on its own objective, objective >= bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moetuner.placement.problem import PlacementProblem, get_solver
from moetuner.placement.steptail import lower_bound, profile_steps, step_objective
from moetuner.simulator import cost_model
from test_solvers import random_trace, topology

FAST = {"time_limit_s": 1.0}


def objective(problem: PlacementProblem, phy2log: np.ndarray, dataflow: str, policy: str = "balanced") -> float:
    cost = cost_model(problem.topology, problem.profile.hidden_size, problem.profile.moe_intermediate_size)
    ids, primary = profile_steps(problem)
    return float(step_objective(phy2log, problem, cost, ids, primary, dataflow, policy).sum())


@pytest.mark.parametrize("dataflow,replicas", [("dispatch_combine", 0), ("dispatch_combine", 1),
                                               ("expert_to_expert", 0)])
def test_valid_and_never_worse_than_warm_start(dataflow: str, replicas: int) -> None:
    problem = PlacementProblem(random_trace(256, 3, 16, 2, seed=3), topology(2, 2), replicas=replicas,
                               step_tokens=64)
    placement = get_solver("steptail")(problem, {**FAST, "dataflow": dataflow})
    placement.validate(16)
    assert placement.phy2log.shape == (3, problem.num_slots) and placement.solver == "steptail"
    assert placement.objective == pytest.approx(objective(problem, placement.phy2log, dataflow))
    for warm in ("eplb", "greedy"):
        assert placement.objective <= objective(problem, get_solver(warm)(problem, {}).phy2log, dataflow) + 1e-12
    assert placement.extra["warm_objective"] >= placement.objective
    assert 0 < placement.bound <= placement.objective


def test_bound_below_brute_force_optimum() -> None:
    # 4 experts on 2 GPUs (2 slots each): all 6 ways to split them; the best is still >= the bound
    problem = PlacementProblem(random_trace(64, 1, 4, 2, seed=5), topology(1, 2), step_tokens=16)
    cost = cost_model(problem.topology, 8, 8)
    ids, _ = profile_steps(problem)
    best = min(objective(problem, np.array([[a, b, *sorted(set(range(4)) - {a, b})]]), "dispatch_combine")
               for a, b in itertools.combinations(range(4), 2))
    bound = lower_bound(problem, cost, ids)
    assert 0 < bound <= best
    placement = get_solver("steptail")(problem, FAST)
    assert placement.objective == pytest.approx(best)  # the tiny instance is solved to optimality


def test_bound_by_hand() -> None:
    # one step of 4 tokens, top-1, experts 0,0,0,1 on 2 GPUs, f(n) = max(n * a, w) with a = 6*8*8 / 1e12
    # and w = 3*8*8*2 / 1e9: n <= 3 is memory-bound (w); spread = (w + w) / 2 = w, hottest = f(3 / 1) = w
    from test_solvers import make_trace

    problem = PlacementProblem(make_trace(np.array([0, 0, 0, 1])[:, None, None], 2), topology(1, 2), step_tokens=4)
    cost = cost_model(problem.topology, 8, 8)
    assert lower_bound(problem, cost, profile_steps(problem)[0]) == pytest.approx(3 * 8 * 8 * 2 / 1e9)


def test_options_are_honoured() -> None:
    problem = PlacementProblem(random_trace(128, 2, 8, 2), topology(1, 2), step_tokens=32)
    placement = get_solver("steptail")(problem, {"time_limit_s": 0.2, "warm_starts": ["contiguous"],
                                                 "replica_policy": "round_robin"})
    assert placement.extra["replica_policy"] == "round_robin"
    contiguous = get_solver("contiguous")(problem, {}).phy2log
    assert placement.objective <= objective(problem, contiguous, "dispatch_combine", "round_robin")
