"""The cost model: hand-computed 2-GPU, 4-token cases for both dataflows, replica policies, errors."""

from __future__ import annotations

import numpy as np
import pytest

from moetuner.placement.layout import PlacementError, contiguous_phy2log
from moetuner.simulator import (DATAFLOWS, REPLICA_POLICIES, CostModel, SimulationError, choose_slots,
                                cost_model, layer_slots, simulate, water_fill)
from moetuner.topology import topology_from_config

# 2 GPUs on 2 nodes; experts 0,1 on GPU 0 and 2,3 on GPU 1; tokens 0..3 live on GPUs 0,1,0,1.
IDS = np.array([[[0, 1], [2, 3]],   # token 0: layer 0 -> GPU {0},   layer 1 -> GPU {1}
                [[0, 2], [0, 1]],   # token 1: layer 0 -> GPU {0,1}, layer 1 -> GPU {0}
                [[2, 3], [0, 2]],   # token 2: layer 0 -> GPU {1},   layer 1 -> GPU {0,1}
                [[1, 3], [2, 3]]])  # token 3: layer 0 -> GPU {0,1}, layer 1 -> GPU {1}
CONTIGUOUS = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
PRIMARY = np.zeros((4, 2), dtype=np.int64)  # first listed expert is the primary one


def unit_cost(num_gpus: int = 2, nodes: int = 2) -> CostModel:
    """f(n) = n seconds, 1 byte per token, 1 B/s links, 0.5 s latency across nodes, 0.25 s inside."""
    node = np.arange(num_gpus) // (num_gpus // nodes)
    latency = np.where(node[:, None] == node[None, :], 0.25, 0.5)
    np.fill_diagonal(latency, 0.0)
    bandwidth = np.ones((num_gpus, num_gpus))
    np.fill_diagonal(bandwidth, np.inf)
    return CostModel(per_token_s=1.0, floor_s=0.0, fixed_s=0.0, token_bytes=1.0, bandwidth=bandwidth,
                     latency=latency, node=node)


def run(phy2log: np.ndarray, ids: np.ndarray, dataflow: str, policy: str = "round_robin",
        cost: CostModel | None = None, step_tokens: int | None = None):
    cost = cost or unit_cost()
    return simulate(phy2log, cost.num_gpus, ids, np.zeros(ids.shape[:2], dtype=np.int64), 4, cost,
                    step_tokens or ids.shape[0], dataflow, policy)


def test_dispatch_combine_by_hand() -> None:
    # Layer 0: copies home -> expert GPUs: t1 1->0, t2 0->1, t3 1->0: matrix [[0,1],[2,0]].
    #   GPU1 sends 2 (2 s + 0.5 s latency), GPU0 receives 2 (2.5 s): dispatch 2.5 s; combine is the
    #   transpose, also 2.5 s. Experts 0,1,2,3 get 2 tokens each: GPUs 4 and 4 -> compute tail 4 s.
    # Layer 1: t0 0->1, t1 1->0, t2 0->1: [[0,2],[1,0]] -> 2.5 s each way; experts get 2,1,3,2
    #   tokens: GPUs 3 and 5 -> tail 5 s. Layer times 9 and 10; step 19 s; 12 copies, all inter-node.
    res = run(CONTIGUOUS, IDS, "dispatch_combine")
    assert res.dispatch_s.tolist() == [[2.5, 2.5]] and res.combine_s.tolist() == [[2.5, 2.5]]
    assert res.tokens.tolist() == [[[4, 4], [3, 5]]]
    assert res.layer_time_s.tolist() == [[9.0, 10.0]]
    m = res.metrics()
    assert m["layer_time_s"] == 19.0 and m["a2a_time_s"] == 10.0 and m["compute_time_s"] == 9.0
    assert m["compute_tail_ratio"] == pytest.approx((1.0 + 5 / 4) / 2)
    assert m["bytes_inter_per_step"] == 12.0 and m["bytes_intra_per_step"] == 0.0


def test_expert_to_expert_by_hand() -> None:
    # Layer 0 dispatch as above (2.5 s). Combine gathers on the primary expert's GPU: t0 (GPU0) none,
    #   t1 1->0, t2 (GPU1) none, t3 1->0: [[0,0],[2,0]] -> 2.5 s; tokens end on GPUs 0,0,1,0.
    # Layer 1 dispatch from there: t0 0->1, t1 none, t2 1->0, t3 0->1: [[0,2],[1,0]] -> 2.5 s.
    #   Last layer combines home (0,1,0,1): t0 1->0, t1 0->1, t2 1->0, t3 none: 2.5 s.
    # Copies: 3 + 2 + 3 + 3 = 11 (one fewer than dispatch-combine); same times as dispatch-combine.
    res = run(CONTIGUOUS, IDS, "expert_to_expert")
    assert res.dispatch_s.tolist() == [[2.5, 2.5]] and res.combine_s.tolist() == [[2.5, 2.5]]
    assert res.metrics()["layer_time_s"] == 19.0 and res.metrics()["bytes_inter_per_step"] == 11.0


def test_expert_to_expert_follows_affinity() -> None:
    # Every token uses expert 0 then 1 (both on GPU 0) or 2 then 3 (GPU 1) in each layer: after the
    # layer-0 dispatch, tokens stay where their experts are until they go home at the end.
    ids = np.array([[[0, 1], [0, 1]], [[0, 1], [0, 1]], [[2, 3], [2, 3]], [[2, 3], [2, 3]]])
    e2e, dc = run(CONTIGUOUS, ids, "expert_to_expert"), run(CONTIGUOUS, ids, "dispatch_combine")
    # tokens 1 (home 1) and 2 (home 0) are away: dispatch-combine moves them twice per layer (8 copies),
    # expert-to-expert once in and once home (4 copies)
    assert dc.metrics()["bytes_inter_per_step"] == 8.0 and e2e.metrics()["bytes_inter_per_step"] == 4.0
    assert e2e.combine_s[0, 0] == 0.0 and e2e.dispatch_s[0, 1] == 0.0


def test_roofline_and_calibration_constants() -> None:
    base = {"name": "t", "nodes": 2, "gpus_per_node": 2, "intra_node_bw_GBps": 100.0, "inter_node_bw_GBps": 10.0,
            "inter_node_latency_us": 5.0, "gpu_peak_tflops": 1.0, "hbm_bw_GBps": 2.0}
    cost = cost_model(topology_from_config(base), hidden_size=1000, intermediate_size=500)
    assert cost.per_token_s == pytest.approx(6 * 1000 * 500 / 1e12)  # SwiGLU flops per token
    assert cost.floor_s == pytest.approx(3 * 1000 * 500 * 2 / 2e9)  # bf16 weights read once
    assert cost.token_bytes == 2000.0 and cost.bandwidth[0, 2] == 10e9 and cost.latency[0, 2] == pytest.approx(5e-6)
    assert cost.expert_time(np.array([0, 1, 10 ** 6])).tolist() == pytest.approx([0.0, 1.5e-3, 3.0])
    cal = {**base, "calibration": {"expert_fixed_s": 1e-3, "expert_per_token_s": 2e-6, "inter_node_bw_GBps": 1.0}}
    cost = cost_model(topology_from_config(cal), hidden_size=1000, intermediate_size=500)
    assert cost.expert_time(np.array([0, 10])).tolist() == pytest.approx([0.0, 1.02e-3])
    assert cost.bandwidth[0, 2] == 1e9 and cost.bandwidth[0, 1] == 100e9


def test_steps_are_consecutive_token_windows() -> None:
    res = run(CONTIGUOUS, np.concatenate([IDS, IDS, IDS[:1]]), "dispatch_combine", step_tokens=4)
    assert res.layer_time_s.tolist() == [[9.0, 10.0], [9.0, 10.0]]  # the 9th token is left out


@pytest.mark.parametrize("policy", REPLICA_POLICIES)
def test_replica_policies_conserve_tokens(policy: str) -> None:
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((64, 8)), axis=1)[:, :3]  # 64 tokens, top-3 of 8 experts
    phy2log = contiguous_phy2log(1, 8, 4, 3)  # 4 GPUs x 3 slots, experts 2 per GPU
    phy2log[0, 2::3] = [0, 0, 1, 5]  # replicas of 0 (3 copies), 1 and 5
    slots = layer_slots(phy2log, 4, 8)[0]
    token = np.arange(64)
    pick = lambda name: choose_slots(ids, token, token % 4, slots, name, unit_cost(4, 2))  # noqa: E731
    chosen = pick(policy)
    assert np.array_equal(phy2log[0][chosen], ids)  # every pair served by a replica of its expert
    served = np.bincount(chosen.ravel(), minlength=12)
    assert served.sum() == ids.size
    per_gpu = lambda c: np.bincount(slots.gpu_of_slot[c.ravel()], minlength=4)  # noqa: E731
    if policy == "balanced":  # water-filling never leaves a busier GPU than dealing round robin
        assert per_gpu(chosen).max() <= per_gpu(pick("round_robin")).max()
    else:  # tokens on GPUs 0 and 1 reach all three copies of expert 0 (slots 0, 2, 5)
        assert (served[[0, 2, 5]] > 0).all()


def test_local_first_prefers_own_gpu_then_node() -> None:
    phy2log = np.array([[0, 1, 0, 2, 3, 0, 4, 5]])  # 4 GPUs x 2 slots; expert 0 on GPUs 0, 1 and 2
    slots = layer_slots(phy2log, 4, 6)[0]
    ids = np.array([[0], [0], [0], [0]])
    chosen = choose_slots(ids, np.arange(4), np.array([0, 1, 2, 3]), slots, "local_first", unit_cost(4, 2))
    # tokens on GPUs 0, 1, 2 use their own copy; the token on GPU 3 (node 1) uses GPU 2's (same node)
    assert chosen[:, 0].tolist() == [0, 2, 5, 5]


def test_balanced_splits_a_hot_expert_evenly() -> None:
    phy2log = np.array([[0, 1, 0, 2]])  # GPU0: 0,1; GPU1: 0,2
    slots = layer_slots(phy2log, 2, 3)[0]
    ids = np.array([[0]] * 6 + [[1]] * 2)  # GPU0 already has 2 tokens of expert 1
    chosen = choose_slots(ids, np.arange(8), np.arange(8) % 2, slots, "balanced", unit_cost())
    assert np.bincount(slots.gpu_of_slot[chosen.ravel()]).tolist() == [4, 4]
    assert water_fill(np.array([2.0, 0.0]), 6).tolist() == [2, 4]
    assert water_fill(np.array([5.0, 0.0, 1.0]), 3).tolist() == [0, 2, 1]


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(SimulationError, match="solved for 2 GPUs but the topology has 4"):
        simulate(CONTIGUOUS, 2, IDS, np.zeros((4, 2), dtype=np.int64), 4, unit_cost(4, 2), 4)
    with pytest.raises(PlacementError, match="expert 3 of layer 0 has no slot"):
        run(np.array([[0, 1, 2, -1], [0, 1, 2, 3]]), IDS, "dispatch_combine")
    run(np.array([[0, 1, 2, -1], [0, 1, 2, 3]]), IDS[:, :, :1], "dispatch_combine")  # 3 is never routed: fine
    with pytest.raises(PlacementError, match="placement has 3 layers but the routing has 2 layers"):
        run(np.tile(CONTIGUOUS[:1], (3, 1)), IDS, "dispatch_combine")
    with pytest.raises(SimulationError, match="step_tokens=5 but the trace has 4 tokens"):
        run(CONTIGUOUS, IDS, "dispatch_combine", step_tokens=5)
    with pytest.raises(SimulationError, match="dataflow='ring' is unknown"):
        run(CONTIGUOUS, IDS, "ring")
    with pytest.raises(SimulationError, match="unknown calibration key"):
        cost_model(topology_from_config({"name": "t", "nodes": 1, "gpus_per_node": 2, "intra_node_bw_GBps": 1,
                                         "inter_node_bw_GBps": 1, "gpu_peak_tflops": 1, "hbm_bw_GBps": 1,
                                         "calibration": {"expert_cost": 1}}), 8, 8)


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_replicated_layout_with_all_policies_keeps_pairs(dataflow: str) -> None:
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((48, 3, 8)), axis=-1)[..., :2]
    phy2log = contiguous_phy2log(3, 8, 4, 3)
    phy2log[:, 2::3] = [0, 3, 3, 6]
    cost = unit_cost(4, 2)
    for policy in REPLICA_POLICIES:
        res = simulate(phy2log, 4, ids, np.zeros((48, 3), dtype=np.int64), 8, cost, 16, dataflow, policy)
        assert (res.tokens.sum(-1) == 16 * 2).all()  # every token-expert pair is served once
        assert (res.layer_time_s >= res.compute_tail_s).all()
