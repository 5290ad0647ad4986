"""The batched cost path (costmodel/batched.py) against the simulator, on every shipped topology preset and
on odd small topologies; the settings it refuses; `score`'s charge by hand."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from moetuner.costmodel.batched import simulate_batched
from moetuner.costmodel.charges import LPLB_BUDGET_US, DispatchCharge, counts_exchange_s
from moetuner.costmodel.cost import SimulationError, cost_model
from moetuner.costmodel.score import score
from moetuner.costmodel.settings import DATAFLOWS
from moetuner.costmodel.simulator import simulate
from moetuner.placement import expert_location
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import primary_column

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "topology").glob("*.yaml"))
FIELDS = ("scatter_s", "combine_s", "compute_s", "tokens", "bytes_intra", "bytes_inter")


def random_placement(rng: np.random.Generator, num_layers: int, num_experts: int, num_gpus: int,
                     slots_per_gpu: int) -> np.ndarray:
    """Every expert once per layer, the other slots replicas or empty (-1), shuffled. -> [L, P]"""
    rows = []
    for _ in range(num_layers):
        extra = rng.integers(-1, num_experts, num_gpus * slots_per_gpu - num_experts)
        rows.append(rng.permutation(np.r_[rng.permutation(num_experts), extra]))
    return np.array(rows)


def random_steps(rng: np.random.Generator, num_tokens: int, num_layers: int, num_experts: int, top_k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """ids [T, L, k] distinct per token and skewed (a few hot experts), gate weights [T, L, k]."""
    hot = rng.dirichlet(np.full(num_experts, 0.3), size=num_layers)  # [L, E]
    ids = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False, p=hot[layer])
                              for layer in range(num_layers)]) for _ in range(num_tokens)])
    return ids, rng.random(ids.shape)


def assert_same(batched, reference, rtol: float = 1e-9) -> None:
    for name in FIELDS:
        np.testing.assert_allclose(getattr(batched, name), getattr(reference, name), rtol=rtol, atol=0, err_msg=name)
    np.testing.assert_allclose(batched.layer_time_s.sum(1), reference.layer_time_s.sum(1), rtol=rtol, atol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_batched_equals_simulator_on_every_preset(preset: str) -> None:
    """Random placements with replicas, random steps: per step and layer, every dataflow, dynamic and static."""
    rng = np.random.default_rng(zlib.crc32(preset.encode()))
    topo = topology_from_config(topology_preset(preset))
    G = topo.num_gpus
    E, L, k, B, S = max(2 * G, 64) if G <= 32 else 2 * G, 2, 6, 96, 3
    cost = cost_model(topo, 2048, 1408)
    phy2log = random_placement(rng, L, E, G, -(-E // G) + 1)
    ids, weights = random_steps(rng, S * B, L, E, k)
    location = expert_location(phy2log, G, E)
    for dataflow in DATAFLOWS:
        for dispatch in ("dynamic", "static"):
            ref = simulate(phy2log, G, ids, primary_column(ids, weights), E, cost, B, dataflow, dispatch)
            got = simulate_batched(location, ids.reshape(S, B, L, k), primary_column(ids, weights).reshape(S, B, L),
                                   cost, dataflow, dispatch)
            assert_same(got, ref)


def test_batched_equals_simulator_on_small_topologies() -> None:
    """Odd shapes: tokens not a whole number of rounds of G, empty slots, 3 nodes, serial and concurrent links,
    per-message cost and FP8 scatter bytes on the roofline and the linear expert model."""
    rng = np.random.default_rng(0)
    calibrations = [{}, {"link_model": "concurrent", "message_us": 0.5, "scatter_bytes_per_value": 1,
                         "scatter_scale_block": 16, "combine_bytes_per_value": 2},
                    {"expert_fixed_s": 1e-5, "expert_per_token_s": 2e-7, "link_model": "concurrent"}]
    for trial in range(9):
        nodes, gpn = [(1, 2), (2, 2), (2, 4), (3, 2), (4, 2), (2, 3)][trial % 6]
        G, E, L, k = nodes * gpn, int(rng.choice([8, 12, 16])), 3, 2
        topo = topology_from_config({"name": "t", "nodes": nodes, "gpus_per_node": gpn, "intra_node_bw_GBps": 450.0,
                                     "inter_node_bw_GBps": 50.0, "gpu_peak_tflops": 1.0, "hbm_bw_GBps": 1.0,
                                     "intra_node_latency_us": 2, "inter_node_latency_us": 5,
                                     "calibration": calibrations[trial % 3]})
        cost = cost_model(topo, 64, 32)
        phy2log = random_placement(rng, L, E, G, -(-E // G) + int(rng.integers(0, 3)))
        B = int(rng.choice([12, 16, 30]))
        ids, weights = random_steps(rng, 3 * B, L, E, k)
        for dataflow in DATAFLOWS:
            for dispatch in ("dynamic", "static"):
                ref = simulate(phy2log, G, ids, primary_column(ids, weights), E, cost, B, dataflow, dispatch)
                got = score(expert_location(phy2log, G, E), ids, weights, cost, B, dataflow, dispatch, method="batched")
                assert_same(got.result, ref)


@pytest.mark.parametrize("dispatch", ["lp", "lp_comm"])
def test_batched_refuses_per_batch_dispatches(dispatch: str) -> None:
    topo = topology_from_config(topology_preset("h200_2x8"))
    cost = cost_model(topo, 64, 32)
    rng = np.random.default_rng(1)
    phy2log = random_placement(rng, 2, 32, 16, 3)
    ids, weights = random_steps(rng, 32, 2, 32, 2)
    location = expert_location(phy2log, 16, 32)
    with pytest.raises(SimulationError, match=f"dispatch='{dispatch}'.*step by step with the simulator"):
        simulate_batched(location, ids.reshape(2, 16, 2, 2), None, cost, "dispatch_combine", dispatch)
    with pytest.raises(SimulationError, match="batched path does not reproduce"):
        score(location, ids, weights, cost, 16, dispatch=dispatch, method="batched")
    with pytest.raises(SimulationError, match="method='fast' is unknown"):
        score(location, ids, weights, cost, 16, method="fast")
    auto = score(location, ids, weights, cost, 16, dispatch=dispatch, method="auto")  # falls back to the simulator
    ref = simulate(phy2log, 16, ids, primary_column(ids, weights), 32, cost, 16, "dispatch_combine", dispatch)
    np.testing.assert_array_equal(auto.free_step_s, ref.layer_time_s.sum(1))


def test_score_charges_lp_on_replicated_layers_only() -> None:
    """lp pays the 100 us budget plus the counts all-gather on each replicated layer-step; dynamic pays nothing."""
    topo = topology_from_config(topology_preset("h200_2x8"))
    cost = cost_model(topo, 64, 32)
    rng = np.random.default_rng(2)
    E = 32
    phy2log = random_placement(rng, 2, E, 16, 3)
    phy2log[1] = np.r_[np.arange(E), -np.ones(16 * 3 - E, dtype=np.int64)]  # layer 1: no replica
    ids, weights = random_steps(rng, 64, 2, E, 2)
    location = expert_location(phy2log, 16, E)
    lp = score(location, ids, weights, cost, 32, dispatch="lp", charge=DispatchCharge())
    per_step = LPLB_BUDGET_US * 1e-6 + counts_exchange_s(cost, E)  # layer 0 only
    np.testing.assert_allclose(lp.step_s - lp.free_step_s, per_step, rtol=1e-12)
    assert lp.metrics()["decision_time_s"] == pytest.approx(per_step)
    dynamic = score(location, ids, weights, cost, 32, dispatch="dynamic")
    np.testing.assert_array_equal(dynamic.step_s, dynamic.free_step_s)
