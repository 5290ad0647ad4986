"""The METRO-style solver (solvers/metro.py): its placement reaches the brute-force minimum of the summed per-step
peak of activated experts per GPU on a tiny instance, by hand on a small one, and fills the slot budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moetuner.solvers.metro import solve_metro, step_activation
from moetuner.solvers.problem import PlacementProblem
from test_solvers import make_trace, random_trace, topology


def peak_activated(phy2log_row: np.ndarray, ids: np.ndarray, num_gpus: int, step_tokens: int) -> int:
    """Sum over full steps of the most distinct routed experts among one GPU's slots. ids [T, k]"""
    slots = phy2log_row.reshape(num_gpus, -1)
    total = 0
    for start in range(0, len(ids) - step_tokens + 1, step_tokens):
        routed = set(ids[start:start + step_tokens].ravel().tolist())
        total += max(len(routed & set(row.tolist())) for row in slots)
    return total


def test_step_activation_by_hand() -> None:
    ids = np.array([[0, 1], [1, 2], [3, 0], [3, 3]])
    assert step_activation(ids, 2, 5).tolist() == [[True, True, True, False, False],
                                                   [True, False, False, True, False]]


def test_matches_brute_force_on_a_tiny_instance() -> None:
    """6 experts on 3 GPUs x 2 slots, 8 steps of 4 tokens, top-2: every assignment tried."""
    trace = random_trace(32, 1, 6, 2, seed=5)
    ids = trace.topk_ids[:, 0].astype(np.int64)
    best = min(peak_activated(np.argsort(np.array(gpu_of), kind="stable"), ids, 3, 4)
               for gpu_of in itertools.product(range(3), repeat=6) if np.bincount(gpu_of, minlength=3).max() <= 2)
    placement = solve_metro(PlacementProblem(trace, topology(1, 3), step_tokens=4), {"max_nodes": 1000})
    assert placement.status == "optimal"
    assert peak_activated(placement.phy2log[0], ids, 3, 4) == best
    assert placement.objective == pytest.approx(best / 8)


def test_separates_experts_active_together_by_hand() -> None:
    """2 GPUs x 2 slots; step 1 activates experts 0 and 1, step 2 experts 2 and 3. Apart ({0, 2} | {1, 3} or
    {0, 3} | {1, 2}) each step activates one expert per GPU: mean peak 1; the contiguous {0, 1} | {2, 3}: 2."""
    ids = np.array([0, 1, 0, 1, 2, 3, 2, 3]).reshape(-1, 1, 1)
    placement = solve_metro(PlacementProblem(make_trace(ids, 4), topology(1, 2), step_tokens=4), {})
    gpu_of = {int(e): s // 2 for s, e in enumerate(placement.phy2log[0])}
    assert gpu_of[0] != gpu_of[1] and gpu_of[2] != gpu_of[3]
    assert placement.objective == pytest.approx(1.0)


def test_replicas_fill_the_slot_budget_unless_told_not_to() -> None:
    problem = PlacementProblem(random_trace(64, 2, 8, 2), topology(2, 2), replicas=1, step_tokens=8)
    assert (solve_metro(problem, {}).phy2log >= 0).all()
    assert (solve_metro(problem, {"fill_replicas": False}).phy2log < 0).sum() == 2 * 4


def test_node_budget_is_the_work_budget() -> None:
    """The proven solve above says what stopped it (nothing: proven); with no branch-and-bound node the MIP
    keeps what its root found (here already the optimum, 2.0, but unproven), and the record says the node budget
    stopped it."""
    trace = random_trace(32, 1, 6, 2, seed=5)
    problem = PlacementProblem(trace, topology(1, 3), step_tokens=4)
    proven = solve_metro(problem, {"max_nodes": 1000})
    assert proven.extra["budget_bound_by"] == "none" and proven.extra["max_nodes"] == 1000
    again = solve_metro(problem, {"max_nodes": 1000})
    assert np.array_equal(again.phy2log, proven.phy2log)  # one thread, fixed seed: the same map
    start = solve_metro(problem, {"max_nodes": 0})
    assert start.extra["max_nodes"] == 0 and start.objective >= proven.objective
    assert start.status == "feasible" and start.extra["budget_bound_by"] == "nodes"
