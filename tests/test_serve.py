"""moetuner-serve: EP logits equal the single-process model, replay delivers every pair once,
failures end the job, bad placements are refused before launch. Multi-process tests use gloo."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from moetuner import CONF_DIR
from moetuner.serving.run import serve
from moetuner.placement import Placement, PlacementError, contiguous_phy2log, save_placement
from moetuner.serving.ep_moe import choose_slots
from moetuner.serving.launcher import LaunchError, descendants, failure_cause
from moetuner.serving.emulation import shaped_run
from moetuner.serving.measure import summarize
from moetuner.serving.netns import leftover_namespaces, netns_unavailable_reason
from moetuner.costmodel.cost import CostModel
from moetuner.costmodel.simulator import simulate
from moetuner.trace import Trace, save_trace

E, K = 6, 2


def config(tmp: Path, *overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("serve", overrides=[f"out={tmp / 'run'}", "mlflow.enabled=false",
                                           "launch.timeout_s=120", *overrides])


def three_kinds(num_gpus: int) -> np.ndarray:
    """One layer per placement kind: contiguous, EPLB-like with replicas, with empty slots. [3, G*4]"""
    contiguous = contiguous_phy2log(1, E, num_gpus, 4)[0]
    replicas = np.resize([0, 1, 5, 2, 3, 0, 4, 5, 1, 3, 2, 4], num_gpus * 4)  # every expert, some twice
    empty = {2: [5, 4, 3, -1, 2, 1, 0, -1],  # uneven expert counts per GPU, empty slots between
             4: [5, 4, 3, -1, 2, -1, -1, -1, -1, -1, -1, -1, 1, 0, -1, -1]}[num_gpus]
    return np.stack([contiguous, replicas, empty])


def write_placement(tmp: Path, phy2log: np.ndarray, nodes: int) -> Path:
    path = tmp / "placement.json"
    save_placement(Placement(phy2log, phy2log.shape[1] // 4, nodes, "hand"), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mixtral with 3 MoE layers of 6 experts, top-2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                        num_experts_per_tok=K, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("ckpt") / "mixtral"
    MixtralForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_model_mode_logits_match_single_process(tmp_path: Path, checkpoint: Path, nodes: int) -> None:
    """1 node x 2 ranks (intra-node exchange only) and 2 nodes x 2 ranks (intra and inter node)."""
    placement = write_placement(tmp_path, three_kinds(2 * nodes), nodes)
    metrics = serve(config(tmp_path, "mode=model", f"model.path={checkpoint}", f"placement={placement}",
                           f"topology.nodes={nodes}"))
    assert metrics["logits_match"] is True and metrics["max_abs_diff"] <= 1e-4
    table = pd.read_csv(tmp_path / "run" / "per_layer.csv")
    assert sorted(table["rank"].unique()) == list(range(2 * nodes))
    assert sorted(table["layer"].unique()) == [0, 1, 2]
    assert (metrics["bytes_inter_per_step"] > 0) == (nodes > 1)
    assert metrics["emulated_network"] == (nodes > 1 and netns_unavailable_reason() is None)
    assert not leftover_namespaces(f"mt{__import__('os').getpid()}")


def expected_pairs(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """How often each (token, layer, expert) pair must be computed: once per top-k entry. [T, L, k] -> [T, L, E]"""
    expected = np.zeros((*topk_ids.shape[:2], num_experts), dtype=np.int64)
    t, layer = np.indices(topk_ids.shape[:2])
    for j in range(topk_ids.shape[2]):
        expected[t, layer, topk_ids[:, :, j]] += 1
    return expected


def tiny_trace(path: Path, tokens: int = 48, layers: int = 3) -> Trace:
    rng = np.random.default_rng(1)
    ids = np.array([[rng.choice(E, K, replace=False) for _ in range(layers)] for _ in range(tokens)])
    trace = Trace(topk_ids=ids.astype(np.int16), seq_ids=np.repeat(np.arange(tokens // 8), 8).astype(np.int32),
                  model="toy", num_experts=E, moe_layers=list(range(layers)), source="test", hidden_size=32,
                  moe_intermediate_size=16, topk_weights=rng.random(ids.shape).astype(np.float32))
    save_trace(trace, path)
    return trace


@pytest.mark.slow
def test_replay_delivers_every_pair_exactly_once(tmp_path: Path) -> None:
    trace = tiny_trace(tmp_path / "trace.safetensors")
    placement = write_placement(tmp_path, three_kinds(4), 2)
    metrics = serve(config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}", f"placement={placement}",
                           "replay.step_tokens=16", "replay.check_delivery=true",
                           "replay.dataflow=expert_to_expert", "replay.shape_scale=4"))
    delivered = np.load(tmp_path / "run" / "delivered.npy")  # [T, L, E] pairs computed over all ranks
    np.testing.assert_array_equal(delivered, expected_pairs(trace.topk_ids, E))
    assert metrics["dataflow"] == "expert_to_expert" and metrics["steps"] == 2  # 3 steps, 1 warm-up
    assert metrics["moe_layer_time_s"] >= metrics["moe_layer_time_mean_s"] > 0


@pytest.mark.parametrize("dataflow", ["dispatch_combine", "hierarchical"])
def test_unshaped_emulation_delivers_every_pair_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             dataflow: str) -> None:
    """emulation.enabled=auto without root (what CI and most laptops get): loopback, but the emulated
    exchange (pre-posted receives, staggered sends, timed compute) computes every pair once."""
    import moetuner.serving.run as serve_app

    monkeypatch.setattr(serve_app, "netns_unavailable_reason", lambda: "not running as root")
    trace = tiny_trace(tmp_path / "trace.safetensors")
    placement = write_placement(tmp_path, three_kinds(4), 2)
    metrics = serve(config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}", f"placement={placement}",
                           "replay.step_tokens=16", "replay.check_delivery=true", f"replay.dataflow={dataflow}",
                           "replay.shape_scale=4", "emulation.enabled=auto", "emulation.dilation=10"))
    assert metrics["emulated_network"] is False and metrics["dilation"] == 10
    assert metrics["emulation_shaped"] is False and not shaped_run(metrics)  # marked: left out of headlines
    assert metrics["injected_s"] + metrics["predicted_comm_s"] == pytest.approx(metrics["predicted_moe_layer_time_s"])
    delivered = np.load(tmp_path / "run" / "delivered.npy")
    np.testing.assert_array_equal(delivered, expected_pairs(trace.topk_ids, E))


@pytest.mark.slow
def test_hierarchical_replay_relays_like_the_simulator(tmp_path: Path) -> None:
    """cpu_2x2, replicas split by `lp`: every pair computed once, and the bytes each phase moves equal
    the simulator's hierarchical copies times the rows' sizes on the wire."""
    trace = tiny_trace(tmp_path / "trace.safetensors")
    phy2log = three_kinds(4)
    placement = write_placement(tmp_path, phy2log, 2)
    metrics = serve(config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}", f"placement={placement}",
                           "replay.step_tokens=16", "replay.check_delivery=true", "replay.dataflow=hierarchical",
                           "replay.dispatch=lp", "replay.shape_scale=4"))
    delivered = np.load(tmp_path / "run" / "delivered.npy")
    np.testing.assert_array_equal(delivered, expected_pairs(trace.topk_ids, E))
    node = np.arange(4) // 2
    links = np.ones((4, 4))
    np.fill_diagonal(links, np.inf)
    cost = CostModel(1.0, 0.0, 0.0, 1.0, links, np.zeros((4, 4)), node)  # token_bytes 1: bytes = copies
    measured = trace.topk_ids[16:].astype(np.int64)  # the 2 steps after the warm-up step
    sim = simulate(phy2log, 4, measured, np.zeros(measured.shape[:2], dtype=np.int64), E, cost, 16,
                   "hierarchical", "lp").metrics()
    # bytes on the wire, per copy there and back: float32 values (dispatch: hidden + k gate weights,
    # combine: hidden) and int64 meta (relay row: token + k slots; dispatch row: token, target, sender's
    # row + k slots; combine row: token)
    hidden = 32 // 4
    combine_row = 4 * hidden + 8
    inter_row, intra_row = (4 * (hidden + K) + 8 * (meta + K) + combine_row for meta in (1, 3))
    assert metrics["bytes_inter_per_step"] == sim["bytes_inter_per_step"] / 2 * inter_row
    assert metrics["bytes_intra_per_step"] == sim["bytes_intra_per_step"] / 2 * intra_row
    flat = simulate(phy2log, 4, measured, np.zeros(measured.shape[:2], dtype=np.int64), E, cost, 16,
                    "dispatch_combine", "lp").metrics()
    assert sim["bytes_inter_per_step"] < flat["bytes_inter_per_step"]  # relaying saves inter-node copies


@pytest.mark.slow
def test_killed_rank_ends_job_with_named_rank(tmp_path: Path) -> None:
    tiny_trace(tmp_path / "trace.safetensors")
    placement = write_placement(tmp_path, three_kinds(2), 1)
    cfg = config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}", f"placement={placement}",
                 "topology.nodes=1", "replay.step_tokens=16", "+fault.rank=1", "+fault.phase=run",
                 "launch.timeout_s=60")
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1\b.*SIGKILL|rank 1\b.*-9"):
        serve(cfg)
    assert time.monotonic() - start < 60
    assert descendants(__import__("os").getpid()) == []
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_hung_rank_ends_job_within_timeout(tmp_path: Path) -> None:
    tiny_trace(tmp_path / "trace.safetensors")
    placement = write_placement(tmp_path, three_kinds(2), 1)
    timeout_s = 20
    cfg = config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}", f"placement={placement}",
                 "topology.nodes=1", "replay.step_tokens=16", "+fault.rank=1", "+fault.phase=run",
                 "+fault.kind=hang", f"launch.timeout_s={timeout_s}")
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank"):
        serve(cfg)
    assert time.monotonic() - start < timeout_s + 30  # bounded: the limit plus tear-down
    assert descendants(__import__("os").getpid()) == []
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_placement_for_other_topology_is_refused_before_launch(tmp_path: Path) -> None:
    tiny_trace(tmp_path / "trace.safetensors")
    placement = write_placement(tmp_path, three_kinds(2), 1)  # 2 GPUs, cpu_2x2 has 4
    with pytest.raises(PlacementError, match="1 node.*2 GPUs.*cpu_2x2"):
        serve(config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}", f"placement={placement}"))
    bad = three_kinds(4)
    bad[0, 0] = E  # expert id out of range
    with pytest.raises(PlacementError, match="expert ids"):
        serve(config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}",
                     f"placement={write_placement(tmp_path, bad, 2)}"))
    assert not (tmp_path / "run" / "logs").exists()


def test_dynamic_replica_choice() -> None:
    # expert 0 has slots 3 and 7, expert 1 slot 2: token t takes replica t % count
    log2phy = torch.tensor([[3, 7], [2, -1]])
    counts = torch.tensor([2, 1])
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert choose_slots(ids, torch.tensor([0, 1, 2]), log2phy, counts).tolist() == [[3, 2], [2, 7], [3, 2]]
    assert choose_slots(ids, torch.tensor([5, 4, 3]), log2phy, counts).tolist() == [[7, 2], [2, 3], [7, 2]]


def test_summarize_tails_and_means() -> None:
    rows = [dict(step=s, layer=l, rank=r, pairs=p, scatter_s=d, compute_s=0.0, combine_s=0.0, layer_s=d,
                 bytes_intra=0, bytes_inter=b)
            for s, l, r, p, d, b in [(0, 0, 0, 2, 1.0, 10), (0, 1, 0, 2, 2.0, 0), (0, 0, 1, 6, 4.0, 0),
                                     (0, 1, 1, 2, 0.5, 0), (1, 0, 0, 4, 1.0, 0), (1, 0, 1, 4, 1.0, 30)]]
    m = summarize(pd.DataFrame(rows), tokens=100, wall_s=2.0)
    # step 0: rank sums 3.0 and 4.5 -> tail 4.5; step 1: 1.0 and 1.0 -> 1.0
    assert m["moe_layer_time_s"] == pytest.approx((4.5 + 1.0) / 2)
    assert m["moe_layer_time_mean_s"] == pytest.approx((3.75 + 1.0) / 2)
    assert m["bytes_inter_per_step"] == pytest.approx(20.0)
    assert m["imbalance"] == pytest.approx((6 / 4 + 1 + 1) / 3)
    assert m["tokens_per_s"] == 50.0


def test_failure_cause_names_rank_and_signal(tmp_path: Path) -> None:
    log = tmp_path / "node0.log"
    log.write_text("Failures:\n  rank      : 0 (local_rank: 0)\nValueError: other\nChildFailedError: x\n"
                   "Root Cause (first observed failure):\n[0]:\n  rank      : 3 (local_rank: 1)\n  exitcode  : -9 (pid: 12)\n  traceback : Signal 9 (SIGKILL) received\n")
    assert failure_cause(log) == ("rank 3 (local_rank: 1); exitcode -9 (pid: 12); "
                                  "traceback Signal 9 (SIGKILL) received; ValueError: other")


def hand_cost(gpus: int = 4, per_node: int = 2) -> "CostModel":
    """f(n) = max(n * 1 ms, 2 ms) + 0.5 ms; latency 1 ms inside a node, 3 ms across."""
    from moetuner.costmodel.cost import CostModel

    node = np.arange(gpus) // per_node
    same = node[:, None] == node[None, :]
    latency = np.where(same, 1e-3, 3e-3)
    np.fill_diagonal(latency, 0.0)
    return CostModel(per_token_s=1e-3, floor_s=2e-3, fixed_s=0.5e-3, token_bytes=64.0,
                     bandwidth=np.full((gpus, gpus), 1e9), latency=latency, node=node)


def test_timed_compute_and_latency_wait_what_the_cost_model_says() -> None:
    from moetuner.serving.emulation import RankEmulator

    emu = RankEmulator(hand_cost(), dilation=10, rank=0)
    start = time.perf_counter()
    emu.start_step()
    emu.expert(0, torch.zeros(5, 3))  # 10 x (max(5 ms, 2 ms) + 0.5 ms) = 55 ms
    emu.expert(1, torch.zeros(1, 3))  # 10 x (2 ms + 0.5 ms) = 25 ms, after the first
    assert time.perf_counter() - start == pytest.approx(0.080, abs=0.015)
    emu.after_payload()
    start = time.perf_counter()
    emu.before_payload(torch.tensor([0, 4, 0, 0]), torch.tensor([0, 0, 0, 0]), start)  # same node: 10 x 1 ms
    emu.after_payload()
    emu.before_payload(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 0, 2]), 0.0)  # rank 3 across: 10 x 3 ms
    assert time.perf_counter() - start == pytest.approx(0.040, abs=0.015)
    # the exchange starts when the last rank is ready: latency counts from that, not from this rank's clock
    emu.after_payload()
    start = time.perf_counter()
    emu.before_payload(torch.tensor([0, 4, 0, 0]), torch.tensor([0, 0, 0, 0]), start + 0.050)  # + 10 x 1 ms
    assert time.perf_counter() - start == pytest.approx(0.060, abs=0.015)


@pytest.mark.parametrize("nodes,per_node", [(2, 2), (2, 8), (1, 8), (4, 4)])
def test_staggered_peers_give_every_receiver_one_sender_per_step(nodes: int, per_node: int) -> None:
    from moetuner.serving.emulation import staggered_peers

    world = nodes * per_node
    orders = np.array([staggered_peers(world, per_node, r) for r in range(world)])  # [W, W - 1]
    for r, order in enumerate(orders):
        assert sorted(order) == [p for p in range(world) if p != r]
    for step in orders.T:  # the i-th message of every rank goes to a different rank
        assert len(set(step.tolist())) == world
    if (nodes, per_node) == (2, 2):
        assert orders.tolist() == [[2, 1, 3], [3, 0, 2], [0, 3, 1], [1, 2, 0]]


def test_dilation_rates_and_predictions_by_hand() -> None:
    from moetuner.serving.emulation import add_predictions, converged_dilation, wire_row_bytes
    from moetuner.costmodel.simulator import SimResult

    # overhead c / D on a 1.0 target: 1 + 200/D; 2000 -> 4000 moves it 1.10 -> 1.05 (4.8%, within 5%)
    probes = [(d, 1.0 + 200 / d) for d in (500, 1000, 2000, 4000)]
    assert converged_dilation(probes, 0.05) == 2000
    assert converged_dilation(probes[:3], 0.05) is None  # 1000 -> 2000 still moves it 9%
    # a dispatch row: 4 * (8 values + 2 gate weights) + 8 * (3 + 2) meta = 80 bytes; combine rows padded to it
    assert wire_row_bytes(8, 2) == 80
    sim = SimResult(scatter_s=np.array([[1.0]]), combine_s=np.array([[2.0]]),
                    compute_s=np.array([[[3.0, 1.0]]]), tokens=np.ones((1, 1, 2)),
                    bytes_intra=np.zeros((1, 1)), bytes_inter=np.zeros((1, 1)))
    table = pd.DataFrame({"step": [1, 1], "layer": [0, 0], "rank": [0, 1]})
    out = add_predictions(table, sim, warmup_steps=1, dilation=10)
    assert out["predicted_layer_s"].tolist() == [60.0, 60.0]  # 10 x (1 + max(3, 1) + 2)
    assert out["predicted_compute_s"].tolist() == [30.0, 10.0]
    assert out["predicted_combine_s"].tolist() == [20.0, 40.0]  # rank 1 waits for rank 0's compute


def test_injected_share_and_transfer_error_by_hand() -> None:
    from moetuner.serving.emulation import emulation_metrics
    from moetuner.costmodel.simulator import SimResult

    def sim(scatter: float, combine: float) -> SimResult:
        return SimResult(scatter_s=np.array([[scatter]]), combine_s=np.array([[combine]]),
                         compute_s=np.array([[[4.0, 1.0]]]), tokens=np.ones((1, 1, 2)),
                         bytes_intra=np.zeros((1, 1)), bytes_inter=np.zeros((1, 1)))

    # predicted 3 + max(4, 1) + 2 = 9; bytes alone 1 + 1, so latency 3 and compute tail 4 are waited out (7 of 9)
    timed = emulation_metrics(100.0, sim(3.0, 2.0), sim(1.0, 1.0), dilation=10, ranks=2, compute="timed",
                              shaped=True)
    assert timed["target_moe_layer_time_s"] == 10.0 and timed["predicted_moe_layer_time_s"] == 9.0
    assert timed["injected_s"] == 7.0 and timed["injected_share"] == pytest.approx(7 / 9)
    assert timed["predicted_comm_s"] == 2.0 and timed["measured_comm_s"] == 3.0  # 10 measured - 7 injected
    assert timed["comm_rel_error"] == pytest.approx(0.5) and timed["prediction_rel_error"] == pytest.approx(1 / 9)
    gemm = emulation_metrics(100.0, sim(3.0, 2.0), sim(1.0, 1.0), 10, 2, "gemm", shaped=False)
    assert gemm["injected_s"] == 3.0 and "comm_rel_error" not in gemm and gemm["emulation_shaped"] is False


def test_shaped_run_marks_only_emulated_runs_on_loopback() -> None:
    assert shaped_run({"moe_layer_time_s": 1.0})  # not emulated: a real cluster or a plain run
    assert shaped_run({"dilation": 5000, "emulation_shaped": True})
    assert not shaped_run({"dilation": 5000, "emulation_shaped": False})
    assert not shaped_run({"dilation": 5000, "emulated_network": False})  # written before emulation_shaped


@pytest.mark.slow
def test_sixteen_emulated_ranks_start_and_stop_cleanly(tmp_path: Path) -> None:
    """h200_2x8 at full rank count: 16 processes, 16 namespaces, timed compute; nothing left after."""
    if netns_unavailable_reason():
        pytest.skip(f"network namespaces unavailable: {netns_unavailable_reason()}")
    rng = np.random.default_rng(2)
    experts, tokens = 16, 64
    ids = np.array([[rng.choice(experts, K, replace=False) for _ in range(2)] for _ in range(tokens)])
    save_trace(Trace(topk_ids=ids.astype(np.int16), seq_ids=np.zeros(tokens, dtype=np.int32), model="toy",
                     num_experts=experts, moe_layers=[0, 1], source="test", hidden_size=64,
                     moe_intermediate_size=32), tmp_path / "trace.safetensors")
    path = tmp_path / "placement.json"
    save_placement(Placement(contiguous_phy2log(2, experts, 16, 1), 16, 2, "contiguous"), path)
    start = time.monotonic()
    metrics = serve(config(tmp_path, f"trace={tmp_path / 'trace.safetensors'}", f"placement={path}",
                           "topology=h200_2x8", "emulation.enabled=true", "emulation.dilation=20",
                           "replay.step_tokens=32", "replay.shape_scale=4", "replay.check_delivery=true"))
    assert metrics["ranks"] == 16 and metrics["dilation"] == 20 and metrics["emulated_network"] is True
    assert metrics["emulation_shaped"] is True and shaped_run(metrics) and 0 < metrics["injected_share"] < 1
    delivered = np.load(tmp_path / "run" / "delivered.npy")  # pre-posted exchanges: every pair once
    np.testing.assert_array_equal(delivered, expected_pairs(ids, experts))
    assert metrics["predicted_moe_layer_time_s"] > 0 and metrics["target_moe_layer_time_s"] > 0
    table = pd.read_csv(tmp_path / "run" / "per_layer.csv")
    assert sorted(table["rank"].unique()) == list(range(16))
    assert {"predicted_layer_s", "predicted_scatter_s", "predicted_compute_s"} <= set(table.columns)
    assert not leftover_namespaces(f"mt{__import__('os').getpid()}")
    assert descendants(__import__("os").getpid()) == []
    assert time.monotonic() - start < 120
