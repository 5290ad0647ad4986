"""Charged per-batch dispatch (costmodel/charges.py) and the paired bootstrap intervals (costmodel/intervals.py):
hand-computed charges and intervals, the charged metrics of run_simulation, errors."""

from __future__ import annotations

import numpy as np
import pytest

from moetuner.costmodel.charges import (DispatchCharge, counts_exchange_s, layer_charges, replicated_layers)
from moetuner.costmodel.cost import SimulationError
from moetuner.costmodel.evaluate import run_simulation
from moetuner.costmodel.intervals import (beaten_in_every_split, bootstrap_speedups, distinguishable,
                                           speedup_interval, split_speedup_interval)
from moetuner.costmodel.settings import DISPATCHES
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
from moetuner.topology import topology_from_config
from test_simulator import unit_cost
from test_solvers import random_trace

INTRA_BW, INTER_BW, INTRA_LAT, INTER_LAT = 450e9, 50e9, 3e-6, 8e-6


def topology_2x2():
    return topology_from_config({"name": "test_2x2", "nodes": 2, "gpus_per_node": 2, "intra_node_bw_GBps": 450.0,
                                 "inter_node_bw_GBps": 50.0, "intra_node_latency_us": 3.0,
                                 "inter_node_latency_us": 8.0, "gpu_peak_tflops": 1.0, "hbm_bw_GBps": 1.0})


def replicated(seed: int = 1):
    """(trace, greedy placement with one extra slot per GPU, on 2 x 2 GPUs: every layer has replicas)."""
    trace = random_trace(256, 3, 8, 2, seed=seed)
    placement = solve_placement(PlacementProblem(trace, topology_2x2(), replicas=1), "greedy", {})
    assert replicated_layers(placement.phy2log, trace.num_experts).all()
    return trace, placement


def test_counts_exchange_by_hand() -> None:
    # 4 GPUs on 2 nodes, 1 B/s links, latency 0.25 s inside a node and 0.5 s across: each GPU sends its
    # 8 int32 counts (32 bytes) to 3 peers, 96 s of bytes + the largest latency 0.5 s
    assert counts_exchange_s(unit_cost(4, 2), 8) == pytest.approx(96.5)
    # one node: only the intra-node latency
    assert counts_exchange_s(unit_cost(4, 1), 8) == pytest.approx(96.25)


def test_replicated_layers() -> None:
    phy2log = np.array([[0, 1, 2, 3], [0, 1, 2, 0], [3, 2, 1, 0]])
    assert replicated_layers(phy2log, 4).tolist() == [False, True, False]


def test_lp_comm_charged_time_is_free_time_plus_decision_time() -> None:
    trace, placement = replicated()
    topo = topology_2x2()
    budget = 100.0
    _, _, metrics = run_simulation(placement, trace, topo, 64, "dispatch_combine", "lp_comm", DISPATCHES,
                                   DispatchCharge("budget", budget))
    # by hand: all-gather of 8 counts x 4 bytes to 1 intra- and 2 inter-node peers, plus the inter-node latency
    exchange = 32 / INTRA_BW + 2 * 32 / INTER_BW + INTER_LAT
    per_step = trace.num_layers * (budget * 1e-6 + exchange)
    for name in ("lp", "lp_comm"):
        m = metrics["by_dispatch"][name]
        assert m["decision_time_s"] == pytest.approx(per_step, rel=1e-12)
        assert m["decision_exchange_s"] == pytest.approx(trace.num_layers * exchange, rel=1e-12)
        assert m["layer_time_s"] == m["layer_time_free_s"] + m["decision_time_s"]
        assert np.mean(m["step_times_s"]) == pytest.approx(m["layer_time_s"], rel=1e-12)
        assert m["speedup_vs_contiguous"] == pytest.approx(m["contiguous_layer_time_s"] / m["layer_time_s"])
    free = run_simulation(placement, trace, topo, 64, "dispatch_combine", "lp_comm",
                          charge=DispatchCharge("budget", 0.0))[0].metrics()["layer_time_s"]
    assert metrics["by_dispatch"]["lp_comm"]["layer_time_free_s"] == pytest.approx(free, rel=1e-12)
    for name in ("dynamic", "static"):  # decided per token from local information: nothing to pay
        m = metrics["by_dispatch"][name]
        assert m["decision_time_s"] == 0.0 and m["layer_time_s"] == m["layer_time_free_s"]
    assert metrics["layer_time_s"] == metrics["by_dispatch"]["lp_comm"]["layer_time_s"]


def test_unreplicated_placement_pays_nothing() -> None:
    trace = random_trace(256, 3, 8, 2, seed=2)
    placement = solve_placement(PlacementProblem(trace, topology_2x2()), "greedy", {})
    _, _, metrics = run_simulation(placement, trace, topology_2x2(), 64, "dispatch_combine", "lp")
    assert metrics["decision_time_s"] == 0.0 and metrics["layer_time_s"] == metrics["layer_time_free_s"]


def test_measured_charge_is_the_recorded_choose_slots_time() -> None:
    trace, placement = replicated()
    result, _, metrics = run_simulation(placement, trace, topology_2x2(), 64, "dispatch_combine", "lp_comm",
                                        charge=DispatchCharge("measured"))
    assert result.choose_s.shape == result.scatter_s.shape and (result.choose_s > 0).all()
    assert metrics["decision_solve_s"] == pytest.approx(result.choose_s.sum(1).mean(), rel=1e-12)
    assert metrics["layer_time_s"] == metrics["layer_time_free_s"] + metrics["decision_time_s"]


def test_layer_charges_by_dispatch() -> None:
    trace, placement = replicated()
    result = run_simulation(placement, trace, topology_2x2(), 64, "dispatch_combine", "lp")[0]
    cost = unit_cost(4, 2)
    on = np.array([True, False, True])
    charges = layer_charges(result, "lp", DispatchCharge("budget", 2e6), cost, 8, on)  # 2 s per solve
    assert charges.solve_s.tolist() == [[2.0, 0.0, 2.0]] * 4
    assert charges.total_s.tolist() == [[98.5, 0.0, 98.5]] * 4
    assert not layer_charges(result, "static", DispatchCharge(), cost, 8, on).total_s.any()


def test_bad_charge_is_refused() -> None:
    trace, placement = replicated()
    with pytest.raises(SimulationError, match="dispatch_charge='free' is unknown"):
        run_simulation(placement, trace, topology_2x2(), 64, "dispatch_combine", "lp", charge=DispatchCharge("free"))
    with pytest.raises(SimulationError, match="dispatch_budget_us=-1"):
        DispatchCharge("budget", -1.0).check()


def test_interval_of_a_placement_against_itself_is_exactly_one() -> None:
    steps = np.random.default_rng(3).uniform(1e-3, 2e-3, size=8)
    assert speedup_interval(steps, steps) == (1.0, 1.0)
    trace = random_trace(256, 3, 8, 2, seed=4)
    contiguous = solve_placement(PlacementProblem(trace, topology_2x2()), "contiguous", {})
    _, _, metrics = run_simulation(contiguous, trace, topology_2x2(), 32, "dispatch_combine", "dynamic")
    assert metrics["speedup_ci95"] == [1.0, 1.0] and metrics["num_steps"] == 8


def test_interval_by_hand() -> None:
    # two steps: base 1, 1; placement 1, 0.5. A resample holds step 0 twice (speedup 1), one of each
    # (2 / 1.5) or step 1 twice (2), with chances 1/4, 1/2, 1/4: the central 95% runs from 1 to 2.
    speedups = bootstrap_speedups(np.array([1.0, 1.0]), np.array([1.0, 0.5]), resamples=4000, seed=0)
    assert set(np.round(speedups, 12)) == {1.0, round(2 / 1.5, 12), 2.0}
    assert abs(np.mean(speedups == 1.0) - 0.25) < 0.03
    assert speedup_interval(np.array([1.0, 1.0]), np.array([1.0, 0.5]), resamples=4000) == (1.0, 2.0)
    # a placement twice as fast on every step is twice as fast on every resample
    low, high = speedup_interval(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    assert low == pytest.approx(2.0, rel=1e-12) and high == pytest.approx(2.0, rel=1e-12)
    # seeded: the same draws every time
    base, other = np.arange(1.0, 9.0), np.arange(1.0, 9.0)[::-1]
    assert speedup_interval(base, other, seed=7) == speedup_interval(base, other, seed=7)


def test_distinguishable_only_when_one_is_outside() -> None:
    assert distinguishable((1.01, 1.2)) and distinguishable([0.8, 0.99])
    assert not distinguishable((0.98, 1.05)) and not distinguishable((1.0, 1.0))


def test_split_interval_by_hand() -> None:
    """Split A: every step 1.5x faster; split B: 0.8x (slower). A resample of both splits' draws is AA
    (1.5), BB (0.8) or mixed (between): the 95% interval runs from 0.8 to 1.5, since each pure draw has
    probability 1/4 > 2.5%. A placement against itself, or a constant speedup, gives a point."""
    base = [np.array([3.0, 3.0, 6.0]), np.array([2.0, 4.0])]
    faster_then_slower = [base[0] / 1.5, base[1] / 0.8]
    assert split_speedup_interval(base, faster_then_slower) == pytest.approx((0.8, 1.5))
    assert split_speedup_interval(base, base) == (1.0, 1.0)
    assert split_speedup_interval(base, [b / 1.2 for b in base]) == pytest.approx((1.2, 1.2))
    assert not beaten_in_every_split([1.5, 0.8]) and beaten_in_every_split([1.01, 1.2])
    assert not beaten_in_every_split([1.2, 1.0])  # a tie is not a win
