"""The cost model: hand-computed 2-GPU, 4-token cases for every dataflow, dispatches (hand cases and brute
force), the lower bound against random placements, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moetuner.placement import PlacementError, contiguous_phy2log, expert_location
from moetuner.costmodel.cost import CostModel, SimulationError, cost_model, pair_copy_matrix
from moetuner.costmodel.settings import DATAFLOWS, DISPATCHES
from moetuner.costmodel.replicas import (choose_slots, pick_lp_comm, round_rows, static_table,
                               water_fill)
from moetuner.costmodel.bounds import comm_lower_bound, compute_lower_bound, lower_bound
from moetuner.costmodel.simulator import layer_step, simulate
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


def run(phy2log: np.ndarray, ids: np.ndarray, dataflow: str, dispatch: str = "dynamic",
        cost: CostModel | None = None, step_tokens: int | None = None):
    cost = cost or unit_cost()
    return simulate(phy2log, cost.num_gpus, ids, np.zeros(ids.shape[:2], dtype=np.int64), 4, cost,
                    step_tokens or ids.shape[0], dataflow, dispatch)


def test_dispatch_combine_by_hand() -> None:
    # Layer 0: copies home -> expert GPUs: t1 1->0, t2 0->1, t3 1->0: matrix [[0,1],[2,0]].
    #   GPU1 sends 2 (2 s + 0.5 s latency), GPU0 receives 2 (2.5 s): dispatch 2.5 s; combine is the
    #   transpose, also 2.5 s. Experts 0,1,2,3 get 2 tokens each: GPUs 4 and 4 -> compute tail 4 s.
    # Layer 1: t0 0->1, t1 1->0, t2 0->1: [[0,2],[1,0]] -> 2.5 s each way; experts get 2,1,3,2
    #   tokens: GPUs 3 and 5 -> tail 5 s. Layer times 9 and 10; step 19 s; 12 copies, all inter-node.
    res = run(CONTIGUOUS, IDS, "dispatch_combine")
    assert res.scatter_s.tolist() == [[2.5, 2.5]] and res.combine_s.tolist() == [[2.5, 2.5]]
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
    assert res.scatter_s.tolist() == [[2.5, 2.5]] and res.combine_s.tolist() == [[2.5, 2.5]]
    assert res.metrics()["layer_time_s"] == 19.0 and res.metrics()["bytes_inter_per_step"] == 11.0


def test_expert_to_expert_follows_affinity() -> None:
    # Every token uses expert 0 then 1 (both on GPU 0) or 2 then 3 (GPU 1) in each layer: after the
    # layer-0 dispatch, tokens stay where their experts are until they go home at the end.
    ids = np.array([[[0, 1], [0, 1]], [[0, 1], [0, 1]], [[2, 3], [2, 3]], [[2, 3], [2, 3]]])
    e2e, dc = run(CONTIGUOUS, ids, "expert_to_expert"), run(CONTIGUOUS, ids, "dispatch_combine")
    # tokens 1 (home 1) and 2 (home 0) are away: dispatch-combine moves them twice per layer (8 copies),
    # expert-to-expert once in and once home (4 copies)
    assert dc.metrics()["bytes_inter_per_step"] == 8.0 and e2e.metrics()["bytes_inter_per_step"] == 4.0
    assert e2e.combine_s[0, 0] == 0.0 and e2e.scatter_s[0, 1] == 0.0


def test_hierarchical_relays_once_per_node_by_hand() -> None:
    # 2 nodes x 2 GPUs, expert e on GPU e. Tokens on GPUs 0..3 need experts {2,3}, {2,3}, {0,3}, {3,1}.
    # Relay = the source's local rank on the other node. Inter-node phase: t0 0->2, t1 1->3, t2 2->0
    #   (expert 0 is on the relay itself), t3 3->1: each GPU sends and receives 1: 1 + 0.5 s.
    # Intra-node phase: forwards t0 2->3 and t1 3->2, direct t2 2->3: GPU 2 sends 2 to GPU 3: 2 + 0.25 s.
    # Dispatch 3.75 s, combine (both phases reversed) 3.75 s; compute: expert 3 has 4 pairs -> 4 s.
    # Copies each way: 4 inter-node, 3 intra-node (dispatch_combine: 6 inter, 1 intra).
    ids = np.array([[[2, 3]], [[2, 3]], [[0, 3]], [[3, 1]]])
    phy2log = np.array([[0, 1, 2, 3]])
    cost = unit_cost(4, 2)
    primary = np.zeros((4, 1), dtype=np.int64)
    res = simulate(phy2log, 4, ids, primary, 4, cost, 4, "hierarchical")
    assert res.scatter_s.tolist() == [[3.75]] and res.combine_s.tolist() == [[3.75]]
    assert res.layer_time_s.tolist() == [[11.5]]
    m = res.metrics()
    assert m["bytes_inter_per_step"] == 8.0 and m["bytes_intra_per_step"] == 6.0
    # dispatch_combine: GPU 3 receives from 0, 1 and 2 (3 + 0.5 s) each way, same compute
    flat = simulate(phy2log, 4, ids, primary, 4, cost, 4, "dispatch_combine").metrics()
    assert flat["layer_time_s"] == 11.0 and flat["bytes_inter_per_step"] == 12.0 and flat["bytes_intra_per_step"] == 2.0


def test_lower_bound_by_hand_is_tight() -> None:
    # 2 GPUs on one node, 1 slot each, 4 tokens all needing experts {0, 1}: every token must send one
    # copy (2 experts, 1 per GPU); each GPU sends 2 copies: 2 + 0.25 s per phase, twice -> 4.5 s.
    # Compute: 8 pairs over 2 GPUs, no room for a replica -> 4 s. The contiguous layout reaches both.
    ids = np.array([[[0, 1]]] * 4)
    cost = unit_cost(2, 1)
    assert comm_lower_bound(ids[:, 0], cost, 1) == 4.5 and compute_lower_bound(ids[:, 0], cost, 1) == 4.0
    res = simulate(np.array([[0, 1]]), 2, ids, np.zeros((4, 1), dtype=np.int64), 2, cost, 4)
    assert lower_bound(ids, cost, 1, 4) == res.metrics()["layer_time_s"] == 8.5


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_lower_bound_never_exceeds_random_placements(dataflow: str) -> None:
    rng = np.random.default_rng(3)
    node = np.arange(4) // 2
    bandwidth = np.where(node[:, None] == node[None, :], 3.0, 1.0)
    np.fill_diagonal(bandwidth, np.inf)
    latency = np.where(node[:, None] == node[None, :], 0.1, 0.4)
    np.fill_diagonal(latency, 0.0)
    cost = CostModel(per_token_s=0.3, floor_s=0.5, fixed_s=0.05, token_bytes=1.0, bandwidth=bandwidth,
                     latency=latency, node=node)
    probs = rng.dirichlet(np.full(8, 0.5))
    ids = np.stack([np.stack([rng.choice(8, 3, replace=False, p=probs) for _ in range(64)]) for _ in range(2)], 1)
    for slots_per_gpu in (2, 3):
        bound = lower_bound(ids, cost, slots_per_gpu, 32, dataflow)
        assert bound > 0
        for _ in range(10):
            row = np.concatenate([np.arange(8), rng.integers(0, 8, 4 * slots_per_gpu - 8)])
            phy2log = np.stack([rng.permutation(row) for _ in range(2)])
            for dispatch in ("dynamic", "static", "lp"):
                res = simulate(phy2log, 4, ids, np.zeros((64, 2), dtype=np.int64), 8, cost, 32, dataflow, dispatch)
                assert bound <= res.metrics()["layer_time_s"] + 1e-12


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


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_dispatches_serve_every_pair_once(dispatch: str) -> None:
    rng = np.random.default_rng(0)
    ids = np.argsort(rng.random((64, 8)), axis=1)[:, :3]  # 64 tokens, top-3 of 8 experts
    phy2log = contiguous_phy2log(1, 8, 4, 3)  # 4 GPUs x 3 slots, experts 2 per GPU
    phy2log[0, 2::3] = [0, 0, 1, 5]  # replicas of 0 (3 copies), 1 and 5
    slots = expert_location(phy2log, 4, 8).layers()[0]
    token = np.arange(64)
    pick = lambda name: choose_slots(ids, token, token % 4, slots, name, unit_cost(4, 2))  # noqa: E731
    chosen = pick(dispatch)
    assert np.array_equal(phy2log[0][chosen], ids)  # every pair served by a replica of its expert
    assert np.bincount(chosen.ravel(), minlength=12).sum() == ids.size
    per_gpu = lambda c: np.bincount(slots.gpu_of_slot[c.ravel()], minlength=4)  # noqa: E731
    if dispatch == "lp":  # the exact min-max never leaves a busier GPU than any other split
        assert per_gpu(chosen).max() <= min(per_gpu(pick(d)).max() for d in DISPATCHES)
    if dispatch == "lp_comm":  # the rounded LP relaxation (forced here) serves every pair too
        rounded = pick_lp_comm(ids, token % 4, slots, unit_cost(4, 2), exact_vars=0)
        assert np.array_equal(phy2log[0][rounded], ids)


def test_round_rows_by_hand() -> None:
    share = np.array([[0.5, 0.5], [1.2, 0.8], [0.0, 3.0]])
    assert round_rows(share, np.array([1, 2, 3])).tolist() == [[1, 0], [1, 1], [0, 3]]


def test_dynamic_splits_by_token_index() -> None:
    phy2log = np.array([[0, 1, 0, 2]])  # GPU0: 0,1; GPU1: 0,2 -> expert 0 in slots 0 and 2
    slots = expert_location(phy2log, 2, 3).layers()[0]
    ids = np.array([[0], [0], [0], [1], [0]])
    chosen = choose_slots(ids, np.arange(5), np.zeros(5, dtype=np.int64), slots, "dynamic", unit_cost())
    assert chosen[:, 0].tolist() == [0, 2, 0, 1, 0]  # token t takes replica t mod 2; expert 1 has one


def test_static_takes_the_nearest_fixed_replica() -> None:
    phy2log = np.array([[0, 1, 0, 2, 3, 0, 4, 5]])  # 4 GPUs x 2 slots; expert 0 on GPUs 0, 1 and 2
    slots = expert_location(phy2log, 4, 6).layers()[0]
    ids = np.array([[0], [0], [0], [0], [0]])
    chosen = choose_slots(ids, np.arange(5), np.array([0, 1, 2, 3, 3]), slots, "static", unit_cost(4, 2))
    # GPUs 0, 1, 2 use their own copy; GPU 3 (node 1) the one on GPU 2 (same node), for every token
    assert chosen[:, 0].tolist() == [0, 2, 5, 5, 5]
    # no copy on the node: GPU g takes the (g mod 2)-th of the equally far replicas (slots 0 and 2)
    far = expert_location(np.array([[0, 1, 0, 2, 3, -1, 4, 5]]), 4, 6).layers()[0]
    assert static_table(far, unit_cost(4, 2).node)[:, 0].tolist() == [0, 2, 0, 2]


def test_lp_balances_the_busiest_gpu_by_hand() -> None:
    phy2log = np.array([[0, 1, 0, 2]])  # GPU0: 0,1; GPU1: 0,2
    slots = expert_location(phy2log, 2, 3).layers()[0]
    ids = np.array([[0]] * 6 + [[1]] * 2)  # GPU0 already has the 2 pairs of expert 1
    chosen = choose_slots(ids, np.arange(8), np.arange(8) % 2, slots, "lp", unit_cost())
    assert np.bincount(slots.gpu_of_slot[chosen.ravel()]).tolist() == [4, 4]
    # of expert 0's six pairs (sources 0,1,0,1,0,1 sorted 0,0,0,1,1,1) GPU0 takes 2, GPU1 4
    assert chosen[:6, 0].tolist() == [0, 2, 0, 2, 2, 2]
    assert water_fill(np.array([2.0, 0.0]), 6).tolist() == [2, 4]
    assert water_fill(np.array([5.0, 0.0, 1.0]), 3).tolist() == [0, 2, 1]


def test_lp_comm_keeps_pairs_where_the_token_already_goes() -> None:
    # 2 GPUs on one node; expert 0 on both; expert 1 only on GPU 1. Both tokens live on GPU 0 and
    # need 0 and 1, so both go to GPU 1 anyway: expert 0's replicas cost no copy either way, and only
    # the compute tail decides.
    phy2log = np.array([[0, -1, 0, 1]])
    slots = expert_location(phy2log, 2, 2).layers()[0]
    cost = unit_cost(2, 1)
    ids = np.array([[0, 1], [0, 1]])
    chosen = choose_slots(ids, np.arange(2), np.zeros(2, dtype=np.int64), slots, "lp_comm", cost)
    # dispatch copies: 2 (both tokens to GPU 1 for expert 1) whatever expert 0 does; compute tail:
    # 2 on GPU 1 if expert 0 stays on GPU 0 (2 pairs there too), else 3 or 4. Optimum: both on GPU 0.
    assert chosen.tolist() == [[0, 3], [0, 3]]
    # 2 nodes x 2 GPUs, one slot each, expert 0 on GPU 1 (same node as the tokens) and GPU 2 (other node);
    # links 4 B/s inside a node, 1 B/s across, f(n) = n s. Two tokens on GPU 0 need expert 0:
    # both to GPU 1: tail 2 + dispatch and combine 2 * 0.5 = 3 s; one each: 1 + 2 * (0.25 + 1) = 3.5 s.
    # lp (pairs only) splits them; lp_comm keeps both on the node.
    node = np.arange(4) // 2
    bandwidth = np.where(node[:, None] == node[None, :], 4.0, 1.0)
    np.fill_diagonal(bandwidth, np.inf)
    cost = CostModel(1.0, 0.0, 0.0, 1.0, bandwidth, np.zeros((4, 4)), node)
    slots = expert_location(np.array([[1, 0, 0, 2]]), 4, 3).layers()[0]
    ids, src = np.array([[0], [0]]), np.zeros(2, dtype=np.int64)
    assert sorted(choose_slots(ids, np.arange(2), src, slots, "lp", cost)[:, 0].tolist()) == [1, 2]
    assert choose_slots(ids, np.arange(2), src, slots, "lp_comm", cost)[:, 0].tolist() == [1, 1]


def brute_force(ids: np.ndarray, src: np.ndarray, slots, cost: CostModel, score) -> float:
    """min over every replica choice of every pair of score(slot [B, k])."""
    options = [slots.log2phy[e, :slots.count[e]] for e in ids.ravel()]
    return min(score(np.array(choice).reshape(ids.shape)) for choice in itertools.product(*options))


def tiny_cases(k: int):
    """(ids [B, k], src [B], slots) of random tiny batches on 2 nodes x 2 GPUs, 8 slots for 6 experts."""
    rng = np.random.default_rng(5)
    for case in range(12):
        phy2log = rng.permutation(np.array([0, 1, 2, 3, 4, 5, rng.integers(6), rng.integers(6)]))[None]
        slots = expert_location(phy2log, 4, 6).layers()[0]
        ids = np.argsort(rng.random((5 if k == 1 else 4, 6)), axis=1)[:, :k]
        if np.prod(slots.count[ids]) > 4096:
            continue
        yield ids, rng.integers(0, 4, len(ids)), slots


def test_lp_equals_brute_force_on_tiny_batches() -> None:
    cost = unit_cost(4, 2)
    for ids, src, slots in tiny_cases(2):
        busiest = lambda c: np.bincount(slots.gpu_of_slot[c.ravel()], minlength=4).max()  # noqa: E731
        chosen = choose_slots(ids, np.arange(len(ids)), src, slots, "lp", cost)
        assert busiest(chosen) == brute_force(ids, src, slots, cost, busiest)


def test_lp_comm_equals_brute_force_on_tiny_batches() -> None:
    # one expert per token and no latency: the split's model (per-token compute tail + dispatch and
    # combine at link bandwidth) is the simulator's layer time, so the optimum must match brute force
    node = np.arange(4) // 2
    bandwidth = np.where(node[:, None] == node[None, :], 4.0, 1.0)
    np.fill_diagonal(bandwidth, np.inf)
    cost = CostModel(per_token_s=1.5, floor_s=0.0, fixed_s=0.0, token_bytes=1.0, bandwidth=bandwidth,
                     latency=np.zeros((4, 4)), node=node)
    checked = 0
    for ids, src, slots in tiny_cases(1):
        token = np.arange(len(ids))

        def layer_time(chosen: np.ndarray) -> float:
            return layer_step(chosen, src, src, slots, cost).time_s

        best = brute_force(ids, src, slots, cost, layer_time)
        chosen = choose_slots(ids, token, src, slots, "lp_comm", cost)
        assert layer_time(chosen) == pytest.approx(best)
        checked += 1
    assert checked >= 8


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(PlacementError, match="placement is for 2 GPUs but the topology has 4; solve a placement"):
        simulate(CONTIGUOUS, 2, IDS, np.zeros((4, 2), dtype=np.int64), 4, unit_cost(4, 2), 4)
    with pytest.raises(PlacementError, match="expert 3 of layer 0 has no slot"):
        run(np.array([[0, 1, 2, -1], [0, 1, 2, 3]]), IDS, "dispatch_combine")
    run(np.array([[0, 1, 2, -1], [0, 1, 2, 3]]), IDS[:, :, :1], "dispatch_combine")  # 3 is never routed: fine
    with pytest.raises(PlacementError, match="placement has 3 layers but the model has 2 MoE layers"):
        run(np.tile(CONTIGUOUS[:1], (3, 1)), IDS, "dispatch_combine")
    with pytest.raises(SimulationError, match="step_tokens=5 but the trace has 4 tokens"):
        run(CONTIGUOUS, IDS, "dispatch_combine", step_tokens=5)
    with pytest.raises(SimulationError, match="dataflow='ring' is unknown"):
        run(CONTIGUOUS, IDS, "ring")
    with pytest.raises(SimulationError, match="dispatch='balanced' is unknown; choose one of"):
        run(CONTIGUOUS, IDS, "dispatch_combine", "balanced")
    with pytest.raises(SimulationError, match="unknown calibration key"):
        cost_model(topology_from_config({"name": "t", "nodes": 1, "gpus_per_node": 2, "intra_node_bw_GBps": 1,
                                         "inter_node_bw_GBps": 1, "gpu_peak_tflops": 1, "hbm_bw_GBps": 1,
                                         "calibration": {"expert_cost": 1}}), 8, 8)


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_replicated_layout_with_all_dispatches_keeps_pairs(dataflow: str) -> None:
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((48, 3, 8)), axis=-1)[..., :2]
    phy2log = contiguous_phy2log(3, 8, 4, 3)
    phy2log[:, 2::3] = [0, 3, 3, 6]
    cost = unit_cost(4, 2)
    for dispatch in DISPATCHES:
        res = simulate(phy2log, 4, ids, np.zeros((48, 3), dtype=np.int64), 8, cost, 16, dataflow, dispatch)
        assert (res.tokens.sum(-1) == 16 * 2).all()  # every token-expert pair is served once
        assert (res.layer_time_s >= res.compute_tail_s).all()


@pytest.mark.parametrize("lead", [(), (3,), (2, 4)])
def test_pair_copy_matrix_counts_every_pair_by_loop(lead: tuple[int, ...]) -> None:
    """One copy per (token, expert) pair to its GPU, none to the token's own GPU, over any leading axes:
    against a plain loop over the pairs (repeated GPUs within a token included)."""
    rng = np.random.default_rng(7)
    num_gpus, tokens, k = 5, 40, 4
    src = rng.integers(0, num_gpus, size=(*lead, tokens))
    dest = rng.integers(0, num_gpus, size=(*lead, tokens, k))
    got = pair_copy_matrix(src, dest, num_gpus)
    want = np.zeros((*lead, num_gpus, num_gpus), dtype=np.int64)
    for index in np.ndindex(*lead):
        for b in range(tokens):
            for gpu in dest[index][b]:
                if gpu != src[index][b]:
                    want[index][src[index][b], gpu] += 1
    assert got.dtype == np.int64 and np.array_equal(got, want)
