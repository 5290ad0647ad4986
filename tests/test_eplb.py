"""moetuner.solvers.eplb: DeepSeek's golden vector, hand-computed cases and the policy invariants."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from moetuner.solvers.eplb import EplbError, balanced_packing, hierarchical, rebalance_experts, replicate_experts
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import get_solver
from moetuner.trace import N_GROUP
from test_solvers import random_trace, topology

GOLDEN_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
GOLDEN_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
GOLDEN_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                 [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_golden_vector() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(GOLDEN_WEIGHT, 16, 4, 2, 8)
    assert phy2log.dtype == torch.int64 and logcnt.dtype == torch.int64
    assert phy2log.tolist() == GOLDEN_PHY2LOG
    assert logcnt.tolist() == GOLDEN_LOGCNT
    assert log2phy.shape == (2, 12, 2)
    for layer in range(2):
        for expert in range(12):
            slots = [s for s in log2phy[layer, expert].tolist() if s >= 0]
            assert len(slots) == logcnt[layer, expert]
            assert all(phy2log[layer, s] == expert for s in slots)


def test_global_policy_by_hand() -> None:
    """weight [10, 4, 2, 1], 6 slots, 2 GPUs: expert 0 gets 3 copies (10/3 < 4), then LPT packing."""
    for groups, nodes in [(1, 1), (3, 2)]:  # 3 groups on 2 nodes is not hierarchical: global policy
        phy2log, log2phy, logcnt = rebalance_experts(torch.tensor([[10.0, 4, 2, 1]]), 6, groups, nodes, 2)
        assert logcnt.tolist() == [[3, 1, 1, 1]]
        assert phy2log.tolist() == [[1, 0, 3, 0, 0, 2]]  # GPU0: 4+10/3+1, GPU1: 10/3+10/3+2
        assert log2phy.tolist() == [[[3, 4, 1], [0, -1, -1], [5, -1, -1], [2, -1, -1]]]


def test_balanced_packing_by_hand() -> None:
    pack, rank = balanced_packing(torch.tensor([[5.0, 1, 4, 2]]), 2)
    # 5 -> pack 0; 4 -> pack 1; 2 -> pack 1 (4 < 5); 1 -> pack 0 (pack 1 is full)
    assert pack.tolist() == [[0, 0, 1, 1]] and rank.tolist() == [[0, 1, 0, 1]]
    pack, rank = balanced_packing(torch.tensor([[1.0, 3, 2]]), 3)  # one item per pack: identity
    assert pack.tolist() == [[0, 1, 2]] and rank.tolist() == [[0, 0, 0]]


def test_packing_sums_in_float64() -> None:
    """Pack totals 10,000,000 + 6,777,217 = 16,777,217 vs 9,000,000 + 7,777,216 = 16,777,216: pack 1 is
    lighter, so 100 goes there. In float32 the first total rounds to 2**24, a tie that pack 0 would win."""
    weight = torch.tensor([[10_000_000.0, 9_000_000, 7_777_216, 6_777_217, 100, 50]])
    pack, rank = balanced_packing(weight, 2)
    assert pack.tolist() == [[0, 1, 1, 0, 1, 0]] and rank.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_replicate_by_hand() -> None:
    phy2log, rank, count = replicate_experts(torch.tensor([[6.0, 5, 1]]), 5)
    # 6 > 5: copy 0 (3 each); then 5 > 3: copy 1 (2.5 each)
    assert phy2log.tolist() == [[0, 1, 2, 0, 1]]
    assert rank.tolist() == [[0, 0, 0, 1, 1]]
    assert count.tolist() == [[2, 2, 1]]


@pytest.mark.parametrize("experts,groups,nodes,gpus,slots", [(16, 4, 2, 4, 20), (32, 8, 4, 8, 40), (24, 3, 1, 6, 24)])
def test_hierarchical_invariants(experts: int, groups: int, nodes: int, gpus: int, slots: int) -> None:
    weight = torch.from_numpy(np.random.default_rng(experts).integers(1, 100, (3, experts))).float()
    phy2log, log2phy, logcnt = rebalance_experts(weight, slots, groups, nodes, gpus)
    assert phy2log.shape == (3, slots) and logcnt.sum(1).tolist() == [slots] * 3
    counts = torch.zeros_like(logcnt)
    counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counts, logcnt)
    group_size, per_node = experts // groups, slots // nodes
    node_of_slot = torch.arange(slots) // per_node
    for layer in range(3):
        for group in range(groups):  # a group's experts and all their copies stay on one node
            in_group = (phy2log[layer] // group_size) == group
            assert node_of_slot[in_group].unique().numel() == 1
        for node in range(nodes):  # min-max replication: no copy was added below the node's final max
            experts_here = phy2log[layer, node_of_slot == node].unique()
            w, cnt = weight[layer, experts_here], logcnt[layer, experts_here]
            assert cnt.sum() == per_node
            copied = cnt > 1
            if copied.any():
                assert (w / (cnt - 1).clamp(min=1))[copied].min() >= (w / cnt).max() - 1e-4


@pytest.mark.parametrize("args,message", [
    ((16, 5, 1, 4), "num_experts=12 is not divisible by num_groups=5"),
    ((16, 4, 2, 3), "num_gpus=3 is not divisible by num_nodes=2"),
    ((18, 4, 2, 4), "num_replicas=18 is not divisible by num_gpus=4"),
    ((8, 4, 2, 4), "num_replicas=8 < num_experts=12"),
])
def test_errors(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(EplbError, match=message):
        rebalance_experts(GOLDEN_WEIGHT, *args)


# --- as a solver: the model's expert groups pick the policy, as SGLang's compute_algorithm ---------------


@pytest.mark.parametrize("n_group,nodes,policy", [(1, 2, "global"), (8, 2, "hierarchical"), (8, 1, "hierarchical"),
                                                  (4, 8, "global"), (None, 2, "global")])
def test_policy_choice(n_group: int | None, nodes: int, policy: str) -> None:
    """SGLang 0.5.23 compute_algorithm('auto'): hierarchical iff num_groups is not None and divides by nodes."""
    assert hierarchical(n_group, nodes) == (policy == "hierarchical")


def _problem(n_group: int | None, nodes: int, replicas: int = 0) -> PlacementProblem:
    trace = random_trace(512, 3, 32, 4, seed=5)
    if n_group is not None:
        trace = replace(trace, extra={N_GROUP: str(n_group)}).validate()
    return PlacementProblem(trace, topology(nodes, 4), replicas=replicas)


@pytest.mark.parametrize("replicas", [0, 1])
def test_solver_uses_the_traces_groups(replicas: int) -> None:
    """Two nodes: a model without groups (unrecorded or n_group=1) gets the global policy; n_group=8 the
    hierarchical one over its 8 groups; eplb_node_groups 2 contiguous groups (hierarchical)."""
    cases = [(None, "eplb", 1, 1), (1, "eplb", 1, 1), (8, "eplb", 8, 2), (1, "eplb_node_groups", 2, 2)]
    for n_group, solver, groups, nodes in cases:
        problem = _problem(n_group, 2, replicas)
        placement = get_solver(solver)(problem, {})
        expected, _, _ = rebalance_experts(torch.from_numpy(problem.load), problem.num_slots, groups, nodes, 8)
        assert np.array_equal(placement.phy2log, expected.numpy()), (n_group, solver)
        assert placement.extra["eplb_policy"] == ("hierarchical" if nodes > 1 else "global")
    # the global and the node-grouped policies differ on this load (the choice matters)
    assert not np.array_equal(get_solver("eplb")(_problem(1, 2), {}).phy2log,
                              get_solver("eplb_node_groups")(_problem(1, 2), {}).phy2log)


def test_num_groups_option_overrides_the_trace() -> None:
    problem = _problem(1, 2)
    expected, _, _ = rebalance_experts(torch.from_numpy(problem.load), problem.num_slots, 4, 2, 8)
    placement = get_solver("eplb")(problem, {"num_groups": 4})
    assert np.array_equal(placement.phy2log, expected.numpy()) and placement.extra["num_groups"] == 4
