"""The fixed-placement lower bound (costmodel/placement_bound.py): a hand case where it is tight and the per-step
bound is not, brute force over every placement of tiny instances under every dispatch (it never exceeds the best),
FlashLB's golden case (vllm-ascend #3042), and the inputs it refuses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moetuner.costmodel.bounds import lower_bound
from moetuner.costmodel.cost import CostModel, SimulationError
from moetuner.costmodel.placement_bound import fixed_placement_bound
from moetuner.costmodel.settings import DISPATCHES
from moetuner.costmodel.simulator import simulate
from moetuner.placement import gpu_loads
from moetuner.solvers.eplb import rebalance_experts


def links(num_gpus: int, per_node: int, intra_bw: float, inter_bw: float, intra_lat: float, inter_lat: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bandwidth, latency, node) of `num_gpus` GPUs, `per_node` to a node."""
    node = np.arange(num_gpus) // per_node
    same = node[:, None] == node[None, :]
    bandwidth, latency = np.where(same, intra_bw, inter_bw), np.where(same, intra_lat, inter_lat)
    np.fill_diagonal(bandwidth, np.inf)
    np.fill_diagonal(latency, 0.0)
    return bandwidth, latency, node


def best_simulated(ids: np.ndarray, cost: CostModel, num_experts: int, slots_per_gpu: int, step_tokens: int,
                   dataflow: str, dispatches: tuple[str, ...], distinct: bool = False) -> float:
    """The fastest mean step time over every placement (every expert in at least one slot; `distinct`: no
    expert twice on one GPU) and dispatch."""
    best = np.inf
    primary = np.zeros(ids.shape[:2], dtype=np.int64)
    per_gpu = itertools.combinations_with_replacement(range(num_experts), slots_per_gpu)  # slot order is moot
    for gpus in itertools.product(list(per_gpu), repeat=cost.num_gpus):
        row = [e for slots in gpus for e in slots]
        if len(set(row)) < num_experts or (distinct and any(len(set(s)) < len(s) for s in gpus)):
            continue
        phy2log = np.array([row])
        for dispatch in dispatches:
            res = simulate(phy2log, cost.num_gpus, ids, primary, num_experts, cost, step_tokens, dataflow, dispatch)
            best = min(best, res.metrics()["layer_time_s"])
    return best


def test_tight_where_the_per_step_bound_lets_the_placement_change() -> None:
    """2 GPUs on 2 nodes, 1 slot each, f(n) = n, 1 byte at 1 B/s, 0.5 s latency. Step 1: GPU 0's tokens want
    expert 0, GPU 1's expert 1; step 2 the reverse. A placement per step keeps every token home (per-step
    bound: compute 2 + comm 0); one placement for both makes one step send 2 copies each way per GPU
    (2 x (2 + 0.5) = 5 s): mean 2 + 5 / 2 = 4.5 s, whichever placement."""
    bandwidth, latency, node = links(2, 1, 1.0, 1.0, 0.5, 0.5)
    cost = CostModel(1.0, 0.0, 0.0, 1.0, bandwidth, latency, node)
    ids = np.array([0, 1, 0, 1, 1, 0, 1, 0]).reshape(8, 1, 1)
    bound = fixed_placement_bound(ids, cost, 1, 4)
    assert bound.per_step_s == pytest.approx(2.0)
    assert bound.step_s == pytest.approx(4.5)
    assert best_simulated(ids, cost, 2, 1, 4, "dispatch_combine", DISPATCHES) == pytest.approx(4.5)


@pytest.mark.parametrize(("link_model", "best"), [("serial", 1.4), ("concurrent", 1.2)])
def test_a_certain_inter_node_latency_is_paid_in_full(link_model: str, best: float) -> None:
    """2 nodes x 2 GPUs, 1 slot each, free compute, 1 byte at 10 B/s, latency 0.1 s inside a node and 0.5 s
    across. Each GPU's 3 tokens need 3 distinct experts, more than a node holds (2), so every GPU surely
    sends across in both phases. Best placement (any): each GPU sends 2 copies (0.2 s serial; 0.1 s on each
    port, concurrent) + 0.5 s latency per phase: 1.4 s serial, 1.2 s concurrent. The bound pays the
    inter-node latency in full and is exact; the per-step bound counts the smallest latency (0.1 s)."""
    bandwidth, latency, node = links(4, 2, 10.0, 10.0, 0.1, 0.5)
    cost = CostModel(0.0, 0.0, 0.0, 1.0, bandwidth, latency, node, link_model=link_model)
    ids = np.array([0, 1, 2, 3, 1, 2, 3, 0, 2, 3, 0, 1]).reshape(12, 1, 1)
    bound = fixed_placement_bound(ids, cost, 1, 12)
    assert best_simulated(ids, cost, 4, 1, 12, "dispatch_combine", DISPATCHES) == pytest.approx(best)
    assert bound.step_s == pytest.approx(best)
    assert bound.per_step_s < best - 0.5


@pytest.mark.parametrize("link_model", ["serial", "concurrent"])
@pytest.mark.parametrize("dataflow", ["dispatch_combine", "hierarchical", "low_latency"])
def test_never_above_the_best_placement_on_tiny_instances(dataflow: str, link_model: str) -> None:
    """2 nodes x 2 GPUs, 4 experts, top-2, 2 steps of 8 tokens; every placement with 1 slot per GPU under every
    dispatch, and for one case 2 slots (replicas; no expert twice on a GPU; dynamic and lp). The ratio
    bound / best is printed (pytest -s)."""
    rng = np.random.default_rng(7)
    bandwidth, latency, node = links(4, 2, 4.0, 1.0, 0.1, 0.3)
    cost = CostModel(0.2, 0.5, 0.05, 1.0, bandwidth, latency, node, link_model=link_model)
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    ids = np.stack([rng.choice(4, 2, replace=False, p=probs) for _ in range(16)])[:, None, :]
    for slots_per_gpu in (1, 2) if (dataflow, link_model) == ("low_latency", "serial") else (1,):
        bound = fixed_placement_bound(ids, cost, slots_per_gpu, 8, dataflow)
        dispatches = DISPATCHES if slots_per_gpu == 1 else ("dynamic", "lp")
        best = best_simulated(ids, cost, 4, slots_per_gpu, 8, dataflow, dispatches, distinct=slots_per_gpu > 1)
        assert bound.per_step_s == pytest.approx(lower_bound(ids, cost, slots_per_gpu, 8, dataflow))
        assert bound.per_step_s <= bound.step_s + 1e-9 <= best + 2e-9
        print(f"{dataflow} {link_model} S={slots_per_gpu}: bound / best = {bound.step_s / best:.3f} "
              f"(per-step bound {bound.per_step_s / best:.3f})")


FLASHLB = [600, 560, 120, 120, 20, 10, 10, 10]  # vllm-ascend #3042: 8 experts, 8 GPUs, 2 slots each


def even_split_optimum(load: list[int], num_gpus: int, slots_per_gpu: int) -> tuple[float, int]:
    """(best max GPU load, replica-count vectors tried): every vector c >= 1 with sum c = G S, each expert's load
    split evenly over its c copies, copies paired onto GPUs largest with smallest (optimal for 2 per GPU)."""
    assert slots_per_gpu == 2
    slots, best, tried = num_gpus * slots_per_gpu, np.inf, 0
    for cut in itertools.combinations(range(1, slots), len(load) - 1):
        count = np.diff((0, *cut, slots))
        items = np.sort(np.repeat(np.array(load) / count, count))
        best, tried = min(best, float((items[:num_gpus] + items[::-1][:num_gpus]).max())), tried + 1
    return best, tried


def test_flashlb_golden_case() -> None:
    """EPLB reaches 232; the even-split optimum is 196.7 over 6,435 replica-count vectors; the bound is below it."""
    weight = torch.tensor([FLASHLB], dtype=torch.float64)
    phy2log = rebalance_experts(weight, 16, 1, 1, 8)[0].numpy()
    assert gpu_loads(phy2log, weight.numpy(), 8).max() == pytest.approx(232.0)
    best, tried = even_split_optimum(FLASHLB, 8, 2)
    assert tried == 6435 and best == pytest.approx(590 / 3)  # 196.7: 590/3 = 560/3 + 10
    bandwidth, latency, node = links(8, 8, np.inf, np.inf, 0.0, 0.0)
    cost = CostModel(1.0, 0.0, 0.0, 1.0, bandwidth, latency, node)  # f(n) = n, free links: the max GPU load
    ids = np.repeat(np.arange(8), FLASHLB).reshape(-1, 1, 1)
    bound = fixed_placement_bound(ids, cost, 2, len(ids))
    assert bound.step_s <= best
    assert bound.step_s == pytest.approx(sum(FLASHLB) / 8)  # the mean load: 181.25


def test_bad_inputs_name_the_problem() -> None:
    bandwidth, latency, node = links(2, 1, 1.0, 1.0, 0.5, 0.5)
    cost = CostModel(1.0, 0.0, 0.0, 1.0, bandwidth, latency, node)
    ids = np.array([0, 1, 2, 1]).reshape(4, 1, 1)
    with pytest.raises(SimulationError, match="expert_to_expert couples the layers"):
        fixed_placement_bound(ids, cost, 2, 4, "expert_to_expert")
    with pytest.raises(SimulationError, match="raise slots_per_gpu"):
        fixed_placement_bound(ids, cost, 1, 4)
    with pytest.raises(SimulationError, match="step_tokens=5"):
        fixed_placement_bound(ids, cost, 2, 5)
