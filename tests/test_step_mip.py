"""The exact layer MIP (solvers/step_mip.py): its value is the simulator's time of its placement, it matches
brute force over every placement of tiny two-node instances, the fixed-placement bound never exceeds it,
and the inputs it refuses."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from moetuner.costmodel.cost import CostModel, SimulationError
from moetuner.costmodel.placement_bound import fixed_placement_bound
from moetuner.costmodel.simulator import simulate
from moetuner.solvers.step_mip import merged_tokens, solve_layer
from test_placement_bound import links


def gpu_choices(num_experts: int, num_gpus: int, slots_per_gpu: int) -> Iterator[list[int]]:
    """Every map expert -> GPU with at most `slots_per_gpu` experts per GPU."""
    def extend(prefix: list[int], fill: list[int]) -> Iterator[list[int]]:
        if len(prefix) == num_experts:
            yield prefix
            return
        for g in range(num_gpus):
            if fill[g] < slots_per_gpu:
                yield from extend(prefix + [g], fill[:g] + [fill[g] + 1] + fill[g + 1:])
    yield from extend([], [0] * num_gpus)


def row_of_map(gpu_of: list[int], num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Slot row [G * S] of a map expert -> GPU (experts in id order per GPU)."""
    row = np.full(num_gpus * slots_per_gpu, -1, dtype=np.int64)
    for g in range(num_gpus):
        mine = [e for e, on in enumerate(gpu_of) if on == g]
        row[g * slots_per_gpu:g * slots_per_gpu + len(mine)] = mine
    return row


def simulated(row: np.ndarray, ids: np.ndarray, cost: CostModel, num_experts: int, step_tokens: int) -> float:
    """Mean step time of one layer's row [P] on ids [T, 1, k] (dispatch_combine; no replicas, so any dispatch)."""
    primary = np.zeros(ids.shape[:2], dtype=np.int64)
    res = simulate(row[None], cost.num_gpus, ids, primary, num_experts, cost, step_tokens, "dispatch_combine",
                   "dynamic")
    return res.metrics()["layer_time_s"]


def test_merged_tokens_groups_by_home_and_expert_set() -> None:
    """Tokens 0 and 2 share home 0 and the set {1, 3} (in any order and with a repeat); token 1 is alone."""
    home, sets, count = merged_tokens(np.array([[3, 1, 1], [1, 3, 3], [1, 3, 3]]), np.array([0, 1, 0]))
    assert home.tolist() == [0, 1] and [s.tolist() for s in sets] == [[1, 3], [1, 3]] and count.tolist() == [2, 1]


@pytest.mark.parametrize("link_model", ["serial", "concurrent"])
def test_matches_brute_force_and_the_simulator(link_model: str) -> None:
    """2 nodes x 2 GPUs, 8 experts in 2 slots per GPU, top-3, 2 steps of 8 tokens, latencies, per-peer messages
    and a kernel charge: the MIP's value equals the best of all 2,520 placements and the simulated time of its
    own placement, and the fixed-placement bound is at most that."""
    rng = np.random.default_rng(3)
    bandwidth, latency, node = links(4, 2, 4.0, 1.0, 0.1, 0.3)
    cost = CostModel(0.2, 0.5, 0.05, 1.0, bandwidth, latency, node, link_model=link_model, message_s=0.01,
                     kernel_s=0.02)
    popularity = rng.dirichlet(np.ones(8))
    ids = np.stack([rng.choice(8, 3, replace=False, p=popularity) for _ in range(16)])[:, None, :]
    times = [simulated(row_of_map(m, 4, 2), ids, cost, 8, 8) for m in gpu_choices(8, 4, 2)]
    assert len(times) == 2520
    mip = solve_layer(ids[:, 0].reshape(2, 8, 3), cost, 8, 2)
    assert mip.result.status == "optimal"
    assert mip.time_s == pytest.approx(min(times))
    assert simulated(mip.row, ids, cost, 8, 8) == pytest.approx(mip.time_s)
    assert fixed_placement_bound(ids, cost, 2, 8).step_s <= mip.time_s + 1e-9


def test_warm_start_and_node_budget() -> None:
    """With no node to explore, the MIP returns its warm start (every expert on the GPU given) at that
    placement's simulated time, stopped by the node budget."""
    rng = np.random.default_rng(5)
    bandwidth, latency, node = links(4, 2, 4.0, 1.0, 0.1, 0.3)
    cost = CostModel(0.2, 0.5, 0.05, 1.0, bandwidth, latency, node)
    ids = rng.integers(0, 8, size=(16, 1, 2))
    start = np.array([3, 3, 2, 2, 1, 1, 0, 0])
    mip = solve_layer(ids[:, 0].reshape(2, 8, 2), cost, 8, 2, start=start, max_nodes=0)
    assert mip.row.tolist() == [6, 7, 4, 5, 2, 3, 0, 1]
    assert mip.time_s == pytest.approx(simulated(mip.row, ids, cost, 8, 8))
    assert (mip.result.status, mip.result.bound_by) == ("feasible", "nodes")


def test_bad_inputs_name_the_problem() -> None:
    bandwidth, latency, node = links(2, 1, 1.0, 1.0, 0.5, 0.5)
    cost = CostModel(1.0, 0.0, 0.0, 1.0, bandwidth, latency, node)
    windows = np.array([0, 1, 2, 1]).reshape(1, 4, 1)
    with pytest.raises(SimulationError, match="dispatch_combine only"):
        solve_layer(windows, cost, 3, 2, dataflow="hierarchical")
    with pytest.raises(SimulationError, match="raise slots_per_gpu"):
        solve_layer(windows, cost, 3, 1)
    with pytest.raises(SimulationError, match="expert id 2"):
        solve_layer(windows, cost, 2, 1)
