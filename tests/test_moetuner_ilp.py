"""MoETuner ILPs against exhaustive search, objectives recomputed independently, MIP status honesty."""

from __future__ import annotations

import itertools

import numpy as np
import pulp
import pytest

from moetuner.solvers import moetuner_ilp
from moetuner.solvers.baselines import greedy_phy2log
from moetuner.solvers.mip import MipError, MipResult, solve_mip
from moetuner.solvers.moetuner_ilp import (build_ilp1, ilp1_objective, ilp2_objective, link_cost,
                                             solve_ilp1, solve_ilp2, solve_moetuner)
from moetuner.solvers.problem import PlacementProblem
from moetuner.profiling.stats import transitions
from test_solvers import busy_cpu, random_trace, topology

EXACT = {"mip_solver": "highs", "time_limit_s": 30.0, "gap_rel": 0.0}


def l1_deviation(load: np.ndarray, cluster_of: tuple[int, ...] | np.ndarray, clusters: int) -> float:
    """sum_c |T_c - mean| by plain loops."""
    totals = [sum(load[e] for e in range(len(load)) if cluster_of[e] == c) for c in range(clusters)]
    return sum(abs(t - sum(load) / clusters) for t in totals)


def link_tail_sum(mass: np.ndarray, gpu_of: np.ndarray, cost: np.ndarray) -> float:
    """sum_l max over GPU pairs g1 != g2 of sum_{c1 on g1, c2 on g2} mass * cost, by plain loops."""
    total = 0.0
    for l in range(len(mass)):
        links = {}
        for c1, c2 in itertools.product(range(mass.shape[1]), repeat=2):
            g1, g2 = gpu_of[l][c1], gpu_of[l + 1][c2]
            if g1 != g2:
                links[g1, g2] = links.get((g1, g2), 0.0) + mass[l, c1, c2] * cost[g1, g2]
        total += max(links.values(), default=0.0)
    return total


def test_ilp1_objective_by_hand() -> None:
    assert ilp1_objective(np.array([5.0, 3, 2, 2]), np.array([0, 1, 1, 0]), 2) == 2.0  # |7-6| + |5-6|


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("min_size,max_size", [(1, 4), (2, 2)])
def test_ilp1_matches_exhaustive_search(seed: int, min_size: int, max_size: int) -> None:
    load = np.random.default_rng(seed).integers(1, 50, 6).astype(float)
    feasible = [a for a in itertools.product(range(3), repeat=6)
                if all(min_size <= a.count(c) <= max_size for c in range(3))]
    best = min(l1_deviation(load, a, 3) for a in feasible)
    cluster_of, result = solve_ilp1(load, 3, min_size, max_size, EXACT)
    assert result.status == "optimal"
    sizes = np.bincount(cluster_of, minlength=3)
    assert sizes.min() >= min_size and sizes.max() <= max_size
    assert l1_deviation(load, cluster_of, 3) == pytest.approx(best)
    assert result.objective == pytest.approx(best) and result.bound == pytest.approx(best, abs=1e-6)


def ilp2_exhaustive(mass: np.ndarray, sizes: np.ndarray, cost: np.ndarray) -> float:
    """Best sum of link tails over every permutation per layer that keeps the memory balance."""
    gpus = len(cost)
    per_gpu = sizes.sum() / gpus
    best = np.inf
    for perms in itertools.product(itertools.permutations(range(gpus)), repeat=len(sizes)):
        gpu_of = np.array(perms)
        held = [sum(sizes[l][c] for l in range(len(sizes)) for c in range(gpus) if gpu_of[l][c] == g)
                for g in range(gpus)]
        if all(np.floor(per_gpu) <= h <= np.ceil(per_gpu) for h in held):
            best = min(best, link_tail_sum(mass, gpu_of, cost))
    return best


@pytest.mark.parametrize("sizes", [[[2, 2, 2], [2, 2, 2]], [[1, 2, 3], [3, 2, 1]], [[1, 1, 4], [2, 2, 2]]])
def test_ilp2_matches_exhaustive_search(sizes: list[list[int]]) -> None:
    """6 experts, 3 GPUs (two nodes: 0,1 | 2), 2 layers; sizes set the memory balance."""
    rng = np.random.default_rng(len(str(sizes)))
    mass = rng.integers(0, 20, (1, 3, 3)).astype(float)
    bw = np.array([[np.inf, 9.0, 1.0], [9.0, np.inf, 1.0], [1.0, 1.0, np.inf]])
    cost = link_cost(bw)
    assert cost[0, 1] == 1.0 and cost[0, 2] == 9.0 and cost[1, 1] == 0.0
    sizes_arr = np.array(sizes)
    best = ilp2_exhaustive(mass, sizes_arr, cost)
    gpu_of, result = solve_ilp2(mass, sizes_arr, cost, EXACT)
    if np.isinf(best):  # no permutation balances memory: the published ILP2 is infeasible
        assert gpu_of is None and result.status == "infeasible"
        return
    assert result.status == "optimal"
    assert sorted(gpu_of[0]) == [0, 1, 2] and sorted(gpu_of[1]) == [0, 1, 2]
    assert link_tail_sum(mass, gpu_of, cost) == pytest.approx(best)
    assert ilp2_objective(mass, gpu_of, cost) == pytest.approx(best)
    assert result.objective == pytest.approx(best)


def test_ilp2_objective_matches_loops_on_random_assignments() -> None:
    rng = np.random.default_rng(5)
    mass = rng.random((3, 4, 4))
    cost = link_cost(topology(2, 2).bandwidth())
    for _ in range(20):
        gpu_of = np.stack([rng.permutation(4) for _ in range(4)])
        assert ilp2_objective(mass, gpu_of, cost) == pytest.approx(link_tail_sum(mass, gpu_of, cost))


@pytest.mark.parametrize("equal", [True, False])
def test_solve_moetuner_objectives_recomputed_from_placement(equal: bool) -> None:
    trace = random_trace(300, 3, 8, 2, seed=11)
    problem = PlacementProblem(trace, topology(2, 2), replicas=1)
    placement = solve_moetuner(problem, {**EXACT, "equal_cluster_size": equal, "fill_replicas": False})
    placement.validate(8)
    assert placement.status in ("optimal", "fallback")  # faithful ILP2 may be infeasible (sizes fixed first)
    gpu_of = placement.phy2log.reshape(3, 4, -1)  # [L, G, S]; each expert once, no fill
    expert_gpu = np.zeros((3, 8), dtype=int)
    for l, g, s in zip(*np.nonzero(gpu_of >= 0)):
        expert_gpu[l, gpu_of[l, g, s]] = g
    counts = np.stack([np.bincount(row, minlength=4) for row in expert_gpu])
    if equal:
        assert (counts == 2).all()
    else:
        assert counts.min() >= 1 and counts.max() <= problem.slots_per_gpu
    load = problem.load
    ilp1 = sum(l1_deviation(load[l], expert_gpu[l], 4) for l in range(3))
    assert placement.extra["ilp1_objective"] == pytest.approx(ilp1)
    r = transitions(trace.topk_ids, 8)
    cost = link_cost(problem.topology.bandwidth())
    assert placement.objective == pytest.approx(link_tail_sum(r, expert_gpu, cost))  # experts as clusters
    if placement.status == "optimal":
        assert placement.bound <= placement.objective + 1e-6


def test_ilp1_without_solution_falls_back_to_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moetuner_ilp, "solve_mip", lambda prob, **kw: MipResult("no_solution", None, None, 0.0, "highs"))
    problem = PlacementProblem(random_trace(200, 2, 8, 2), topology(1, 4))
    placement = solve_moetuner(problem, {"ilp2_max_vars": 0})
    assert placement.status == "fallback" and placement.bound is None
    assert any("ILP1 layer 0" in r for r in placement.extra["fallback_reasons"])
    assert any("ilp2_max_vars" in r for r in placement.extra["fallback_reasons"])
    greedy = greedy_phy2log(problem.load, 4, 2)
    for layer in range(2):  # same expert sets per GPU as greedy (GPUs may be permuted by the affinity)
        ours = {frozenset(row) for row in placement.phy2log[layer].reshape(4, 2)}
        assert ours == {frozenset(row) for row in greedy[layer].reshape(4, 2)}


def hard_partition(experts: int = 30, clusters: int = 6) -> pulp.LpProblem:
    """L1-balanced partition of random loads: the LP bound is 0, so proving optimality takes long."""
    load = np.random.default_rng(0).integers(1000, 2000, experts).astype(float) + 0.37
    return build_ilp1(load, clusters, 1, experts)[0]


@pytest.mark.parametrize("mip_solver", ["highs", "cbc"])
def test_time_limited_solve_is_reported_as_such(mip_solver: str) -> None:
    result = solve_mip(hard_partition(), mip_solver=mip_solver, time_limit_s=1.0, gap_rel=0.0, max_nodes=10**9)
    assert result.solver == mip_solver
    assert result.status == "feasible", "PuLP says Optimal here; sol_status must say feasible only"
    assert result.bound_by == "time"  # the cap stopped it, not the (unreachable) node budget
    assert result.objective is not None and result.objective > 0
    if result.bound is not None:  # HiGHS reports its dual bound, CBC through PuLP does not
        assert result.bound <= result.objective and result.gap > 0


@pytest.mark.parametrize("budget", [1, 40])
def test_node_budget_is_honoured(budget: int) -> None:
    result = solve_mip(hard_partition(), gap_rel=0.0, max_nodes=budget)
    assert (result.status, result.bound_by, result.nodes) == ("feasible", "nodes", budget)
    assert result.objective is not None and result.bound <= result.objective


def test_zero_nodes_keep_the_warm_start() -> None:
    """max_nodes=0 (the default study's budget): no branch-and-bound node, the incumbent is the start."""
    load = np.random.default_rng(0).integers(1000, 2000, 30).astype(float) + 0.37
    start = np.arange(30) % 6
    clusters, result = solve_ilp1(load, 6, 5, 5, {"gap_rel": 0.1, "max_nodes": 0}, start=start)
    assert (result.status, result.bound_by, result.nodes) == ("feasible", "nodes", 0)
    assert ilp1_objective(load, clusters, 6) == pytest.approx(ilp1_objective(load, start, 6))


@pytest.mark.slow
def test_same_placement_under_different_cpu_load() -> None:
    """Node budgets on one thread: a solve beside a busy loop gives the same clusters and GPUs."""
    problem = PlacementProblem(random_trace(400, 3, 24, 3, seed=6), topology(2, 3), replicas=1)
    options = {"gap_rel": 0.0, "max_nodes": 30, "seed": 1}
    quiet = solve_moetuner(problem, options)
    with busy_cpu():
        loaded = solve_moetuner(problem, options)
    assert np.array_equal(quiet.phy2log, loaded.phy2log) and quiet.objective == loaded.objective
    assert quiet.extra["mip_nodes"] == loaded.extra["mip_nodes"]
    assert quiet.extra["budget_bound_by"] == loaded.extra["budget_bound_by"] != "time"


def test_mip_options_are_checked() -> None:
    with pytest.raises(MipError, match="mip_solver='gurobi' is not supported"):
        solve_mip(hard_partition(4, 2), mip_solver="gurobi")
    with pytest.raises(MipError, match="time_limit_s must be positive"):
        solve_mip(hard_partition(4, 2), time_limit_s=0)
    with pytest.raises(MipError, match="max_nodes .* must be >= 0"):
        solve_mip(hard_partition(4, 2), max_nodes=-1)


def test_warm_start_is_never_worse_than_the_start() -> None:
    """With a start and no time to search (HiGHS finds nothing alone), the incumbent is the start."""
    load = np.random.default_rng(0).integers(1000, 2000, 30).astype(float) + 0.37
    start = np.arange(30) % 6
    quick = {"mip_solver": "highs", "time_limit_s": 1e-4, "gap_rel": 0.0}
    assert solve_ilp1(load, 6, 5, 5, quick)[0] is None
    clusters, result = solve_ilp1(load, 6, 5, 5, quick, start=start)
    assert result.has_solution
    assert ilp1_objective(load, clusters, 6) <= ilp1_objective(load, start, 6) + 1e-6
    rng = np.random.default_rng(1)
    mass = rng.integers(0, 50, (3, 4, 4)).astype(float)
    cost = link_cost(topology(2, 2).bandwidth())
    gpu_start = np.stack([rng.permutation(4) for _ in range(4)])
    gpu_of, result = solve_ilp2(mass, np.full((4, 4), 2), cost, quick, start=gpu_start)
    assert result.has_solution
    assert ilp2_objective(mass, gpu_of, cost) <= ilp2_objective(mass, gpu_start, cost) + 1e-6
