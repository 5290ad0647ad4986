"""steptail: valid output, never worse than its warm start on its own objective, objective >= bound,
every dispatch and dataflow, several profile domains, the work budget and the time cap, the same
placement under different CPU load."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import get_solver
from moetuner.solvers.steptail import layer_budgets, lower_bound, profile_steps, step_objective
from moetuner.costmodel.cost import cost_model
from moetuner.costmodel.bounds import lower_bound as simulator_bound
from test_solvers import busy_cpu, make_trace, random_trace, topology

FAST = {"max_moves": 400}


def objective(problem: PlacementProblem, phy2log: np.ndarray, dispatch: str | None = None) -> float:
    """steptail's objective recomputed: per-domain step time, combined (worst: vs the contiguous layout's)."""
    cost = cost_model(problem.topology, problem.profile.hidden_size, problem.profile.moe_intermediate_size)
    per_domain = lambda phy: step_objective(phy, problem, cost, profile_steps(problem), dispatch).sum(1)  # noqa: E731
    if problem.robust == "worst":
        return float((per_domain(phy2log) / per_domain(get_solver("contiguous")(problem, {}).phy2log)).max())
    return float(per_domain(phy2log) @ np.array(problem.weights))


@pytest.mark.parametrize("dataflow,dispatch,replicas", [
    ("dispatch_combine", "dynamic", 0), ("dispatch_combine", "dynamic", 1), ("dispatch_combine", "static", 1),
    ("dispatch_combine", "lp", 1), ("hierarchical", "dynamic", 1), ("expert_to_expert", "dynamic", 0)])
def test_valid_and_never_worse_than_warm_start(dataflow: str, dispatch: str, replicas: int) -> None:
    problem = PlacementProblem(random_trace(256, 3, 16, 2, seed=3), topology(2, 2), replicas=replicas,
                               step_tokens=64, dispatch=dispatch, dataflow=dataflow)
    placement = get_solver("steptail")(problem, FAST)
    placement.validate(16)
    assert placement.phy2log.shape == (3, problem.num_slots) and placement.solver == "steptail"
    assert placement.extra["dispatch"] == dispatch and placement.extra["dataflow"] == dataflow
    assert placement.objective == pytest.approx(objective(problem, placement.phy2log))
    for warm in ("eplb", "greedy", "partition"):
        assert placement.objective <= objective(problem, get_solver(warm)(problem, {}).phy2log) + 1e-12
    assert placement.extra["warm_objective"] >= placement.objective
    assert 0 < placement.bound <= placement.objective


def test_lp_comm_is_searched_with_dynamic_and_scored_with_lp_comm() -> None:
    problem = PlacementProblem(random_trace(128, 2, 8, 2, seed=4), topology(2, 2), replicas=1, step_tokens=64,
                               dispatch="lp_comm")
    placement = get_solver("steptail")(problem, {"max_moves": 200, "warm_starts": ["eplb", "greedy"]})
    assert placement.extra["search_dispatch"] == "dynamic"
    assert placement.objective == pytest.approx(objective(problem, placement.phy2log, "lp_comm"))
    assert placement.extra["search_objective"] == pytest.approx(objective(problem, placement.phy2log, "dynamic"))
    assert placement.extra["search_objective"] <= objective(problem, get_solver("eplb")(problem, {}).phy2log,
                                                            "dynamic") + 1e-12
    assert 0 < placement.bound <= placement.objective


def test_bound_is_the_simulator_bound_and_below_brute_force_optimum() -> None:
    # 4 experts on 2 GPUs (2 slots each): all 6 ways to split them; the best is still >= the bound
    problem = PlacementProblem(random_trace(64, 1, 4, 2, seed=5), topology(1, 2), step_tokens=16)
    cost = cost_model(problem.topology, 8, 8)
    steps = profile_steps(problem)
    best = min(objective(problem, np.array([[a, b, *sorted(set(range(4)) - {a, b})]]))
               for a, b in itertools.combinations(range(4), 2))
    bound = lower_bound(problem, cost, steps)
    assert bound == pytest.approx(simulator_bound(problem.profile.topk_ids, cost, 2, 16))
    assert 0 < bound <= best
    placement = get_solver("steptail")(problem, FAST)
    assert placement.objective == pytest.approx(best)  # the tiny instance is solved to optimality


def test_options_are_honoured() -> None:
    problem = PlacementProblem(random_trace(128, 2, 8, 2), topology(1, 2), step_tokens=32, dispatch="static")
    placement = get_solver("steptail")(problem, {"max_moves": 100, "warm_starts": ["contiguous"],
                                                 "search_dispatch": "dynamic"})
    assert placement.extra["search_dispatch"] == "dynamic" and placement.extra["dispatch"] == "static"
    contiguous = get_solver("contiguous")(problem, {}).phy2log
    assert placement.extra["search_objective"] <= objective(problem, contiguous, "dynamic")


def test_layer_budgets_by_hand() -> None:
    assert layer_budgets(10, 4) == [3, 3, 2, 2] and layer_budgets(2, 3) == [1, 1, 0] and layer_budgets(0, 2) == [0, 0]


def test_budget_of_n_moves_is_honoured() -> None:
    problem = PlacementProblem(random_trace(512, 3, 16, 2, seed=1), topology(2, 2), replicas=1, step_tokens=128)
    for budget in (0, 7, 300):
        placement = get_solver("steptail")(problem, {"max_moves": budget})
        assert placement.extra["moves"] == budget == placement.extra["max_moves"]
        assert placement.extra["budget_bound_by"] == "moves"
    # more moves never make the search objective worse (the first 7 moves are the same draws)
    few, many = (get_solver("steptail")(problem, {"max_moves": n}).extra["search_objective"] for n in (7, 300))
    assert many <= few


def test_time_cap_binding_is_reported() -> None:
    problem = PlacementProblem(random_trace(512, 3, 16, 2, seed=1), topology(2, 2), step_tokens=128)
    placement = get_solver("steptail")(problem, {"max_moves": 10**9, "time_limit_s": 1e-9})
    assert placement.extra["budget_bound_by"] == "time" and placement.extra["moves"] < 10**9
    with pytest.raises(ValueError, match="max_moves=-1 must be >= 0"):
        get_solver("steptail")(problem, {"max_moves": -1})


@pytest.mark.slow
def test_same_placement_under_different_cpu_load() -> None:
    """A work budget: a run beside a busy loop scores the same moves as one without."""
    problem = PlacementProblem(random_trace(1024, 4, 32, 4, seed=2), topology(2, 4), replicas=1, step_tokens=256)
    options = {"max_moves": 1500, "seed": 3}
    quiet = get_solver("steptail")(problem, options)
    with busy_cpu():
        loaded = get_solver("steptail")(problem, options)
    assert np.array_equal(quiet.phy2log, loaded.phy2log) and quiet.objective == loaded.objective
    assert quiet.extra["moves"] == loaded.extra["moves"] == 1500
    other_seed = get_solver("steptail")(problem, {**options, "seed": 4})
    assert not np.array_equal(other_seed.phy2log, quiet.phy2log)  # the seed is what draws the moves


def test_several_domains_scored_on_their_own_steps() -> None:
    # domain a: 64 tokens all on experts {0, 1}; domain b: 64 tokens on {2, 3}; 2 GPUs of 2 slots
    a = make_trace(np.tile([[[0, 1]]], (64, 1, 1)), 4)
    b = make_trace(np.tile([[[2, 3]]], (64, 1, 1)), 4)
    mean = PlacementProblem.from_traces([a, b], topology(1, 2), step_tokens=32)
    worst = PlacementProblem.from_traces([a, b], topology(1, 2), step_tokens=32, robust="worst", weights=[0.9, 0.1])
    cost = cost_model(mean.topology, 8, 8)
    phy = np.array([[0, 1, 2, 3]])  # a's experts both on GPU 0: a is slow, b is slow likewise
    per_domain = step_objective(phy, mean, cost, profile_steps(mean)).sum(1)
    assert len(profile_steps(mean)) == 2 and all(len(s.ids) == 2 for s in profile_steps(mean))
    assert objective(mean, phy) == pytest.approx(per_domain.mean())
    assert mean.combine(per_domain) == pytest.approx(per_domain.mean())
    assert worst.combine(per_domain, per_domain / [2.0, 4.0]) == pytest.approx(4.0)  # the worst ratio
    splits = [np.array([[0, x, *sorted({1, 2, 3} - {x})]]) for x in (1, 2, 3)]  # every 2 + 2 split
    for problem in (mean, worst):
        placement = get_solver("steptail")(problem, FAST)
        assert placement.objective == pytest.approx(min(objective(problem, s) for s in splits))  # brute force
        assert placement.objective < objective(problem, phy)
