"""moetuner-online: migration cost by hand, static replay == moetuner-simulate, sampled
out-of-sample steps, charged decision time, no peeking, bad specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from moetuner import PROJECT_ROOT
from moetuner.apps.online import prepare
from moetuner.costmodel.evaluate import run_simulation
from moetuner.online.decision_time import DecisionCost, DecisionCostError
from moetuner.online.migration import (MigrationConfig, MigrationError, expert_bytes, plan_migration, transfers)
from moetuner.online.migration_aware import align_layer
from moetuner.online.policies import Context, Decision, PolicyError, Served
from moetuner.online.policy_config import make_policy
from moetuner.online.stream_replay import make_context, replay_stream
from moetuner.online.stream import StreamError, load_stream
from moetuner.placement import Placement, load_placement
from moetuner.costmodel.cost import CostModel
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import Trace, load_trace, save_trace, split_by_sequence
from test_solvers import random_trace, topology

INF = np.inf
CONF = PROJECT_ROOT / "conf"


def two_gpu_cost(bw: float = 100e9, lat: float = 1e-5) -> CostModel:
    return CostModel(per_token_s=1e-6, floor_s=0.0, fixed_s=0.0, token_bytes=16.0,
                     bandwidth=np.array([[INF, bw], [bw, INF]]), latency=np.array([[0.0, lat], [lat, 0.0]]),
                     node=np.array([0, 0]))


def test_migration_cost_two_gpus_by_hand() -> None:
    cost, per_expert = two_gpu_cost(), expert_bytes(2048, 1408)
    assert per_expert == 3 * 2048 * 1408 * 2
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])  # GPU 0 holds {0, 1}, GPU 1 holds {2, 3}
    new = np.array([[0, 2, 1, 3], [1, 0, 3, 2]])  # layer 0 swaps 1 <-> 2; layer 1 only reorders slots
    assert transfers(old, new, 2, cost).tolist() == [[0, 1], [1, 0]]
    mig = plan_migration(old, new, 2, cost, per_expert)
    # one round: each GPU sends one expert to the other at once (full duplex)
    assert (mig.experts_moved, mig.bytes_moved, mig.rounds) == (2, 2 * per_expert, 1)
    assert mig.duration_s() == pytest.approx(per_expert / 100e9 + 1e-5)
    assert mig.duration_s(0.25) == pytest.approx(per_expert / 25e9 + 1e-5)
    both = np.array([[0, 2, 1, 3], [0, 2, 1, 3]])  # both layers swap: 2 experts each way, still one round
    assert plan_migration(old, both, 2, cost, per_expert).duration_s() == pytest.approx(2 * per_expert / 100e9 + 1e-5)


def test_rounds_let_each_gpu_talk_to_one_peer() -> None:
    # a triangle 0 -> 1 -> 2 -> 0: every pair shares a GPU with the others, so three rounds
    cost = CostModel(1e-6, 0.0, 0.0, 16.0, np.where(np.eye(3, dtype=bool), INF, 10e9), 2e-6 * (1 - np.eye(3)),
                     np.zeros(3, dtype=np.int64))
    old, new = np.array([[0, 1, 2]]), np.array([[2, 0, 1]])
    mig = plan_migration(old, new, 3, cost, 1e9)
    assert mig.rounds == 3 and mig.duration_s() == pytest.approx(3 * (0.1 + 2e-6))
    # four GPUs, 0 <-> 1 and 2 <-> 3: disjoint pairs share one round
    cost4 = CostModel(1e-6, 0.0, 0.0, 16.0, np.where(np.eye(4, dtype=bool), INF, 10e9), np.zeros((4, 4)),
                      np.zeros(4, dtype=np.int64))
    assert plan_migration(np.array([[0, 1, 2, 3]]), np.array([[1, 0, 3, 2]]), 4, cost4, 1e9).rounds == 1
    with pytest.raises(MigrationError, match="expert 5 is in the new placement but on no GPU"):
        plan_migration(old, np.array([[5, 0, 1]]), 3, cost, 1e9)


@dataclass
class SwitchAt:
    """A test policy: the initial map, then `new` before step `at`."""

    first: np.ndarray
    new: np.ndarray
    at: int
    name: str = "switch"

    def initial(self, ctx: Context, profile: Trace) -> Decision:
        return Decision(self.first, "test", 0.0)

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        return Decision(self.new, "test", 0.0) if step == self.at else None


SPLIT = {"holdout_fraction": 0.5, "seed": 0}


def spec(segments: list, profile, split=SPLIT, **extra) -> dict:
    """A stream spec: trace segments given as (path, steps) or as dicts."""
    segs = [s if isinstance(s, dict) else {"trace": str(s[0]), "steps": s[1]} for s in segments]
    return {"segments": segs, "profile": str(profile), "split": split, **extra}


@pytest.fixture
def two_traces(tmp_path: Path) -> tuple[Path, Path]:
    """Two 'domains' of one model: 8 experts, 2 layers, top-2, 256 tokens (8 steps of 32)."""
    return (save_trace(random_trace(256, 2, 8, 2, seed=1), tmp_path / "a.safetensors"),
            save_trace(random_trace(256, 2, 8, 2, seed=2), tmp_path / "b.safetensors"))


def shipped_cost() -> DecisionCost:
    """conf/online.yaml's decision-time model."""
    from omegaconf import OmegaConf

    return DecisionCost.from_config(OmegaConf.to_container(OmegaConf.load(CONF / "online.yaml"))["decision_cost"])


class NoTime:
    """A decision cost of 0 s whatever the work: every decision takes effect at once."""

    def seconds(self, work) -> float:
        return 0.0


def frozen(ctx: Context) -> Context:
    """The context whose decisions take no time: every decision takes effect at once."""
    ctx.decision_cost = NoTime()
    return ctx


@pytest.mark.parametrize("mode", ["stop_the_world", "overlapped"])
def test_replay_charges_migrations_by_hand(two_traces: tuple[Path, Path], mode: str) -> None:
    a, _ = two_traces
    stream, profile = load_stream(spec([(a, 12)], a), 32)
    topo = topology(1, 2)
    ctx = frozen(make_context(stream, topo, 0, "dispatch_combine", "dynamic", MigrationConfig(mode, 0.25), shipped_cost()))
    first = np.tile(np.arange(8), (2, 1))
    new = first.copy()
    new[0, [1, 4]] = new[0, [4, 1]]  # one expert each way in layer 0
    result = replay_stream(stream, profile, SwitchAt(first, new, 3), ctx)
    mig = ctx.migration_of(first, new)
    assert mig.experts_moved == 2 and mig.rounds == 1
    per_expert = expert_bytes(8, 8)
    assert mig.duration_s() == pytest.approx(per_expert / 450e9)  # no latency in this topology
    times = ctx.step_times
    old_t = times.times(first, np.arange(12))
    new_t = times.times(new, np.arange(12))
    steps = [r["step_time_s"] for r in result.rows]
    if mode == "stop_the_world":
        assert result.metrics["migration_time_s"] == pytest.approx(mig.duration_s())
        assert result.versions[1].effective_step == 3
        assert steps == pytest.approx([*old_t.step_s[:3], *new_t.step_s[3:]])
    else:
        assert result.metrics["migration_time_s"] == 0.0
        slowed = list(old_t.compute_s.sum(-1) + old_t.a2a_s.sum(-1) / 0.75)
        left, step = mig.duration_s(0.25), 3  # the transfers run beside steps 3, 4, ... until done
        while left > 0:
            left -= slowed[step]
            step += 1
        assert result.versions[1].effective_step == step
        expected = [*old_t.step_s[:3], *slowed[3:step], *new_t.step_s[step:]]
        assert steps == pytest.approx(expected)
    assert result.metrics["total_time_s"] == pytest.approx(sum(steps) + result.metrics["migration_time_s"])
    assert result.metrics["experts_moved"] == 2 and result.metrics["bytes_moved"] == 2 * per_expert
    assert result.metrics["decision_delay_steps"] == 0.0  # a decision that took no time acts at once


@pytest.mark.parametrize(("dataflow", "dispatch", "nodes"), [("dispatch_combine", "dynamic", 1),
                                                             ("expert_to_expert", "static", 1),
                                                             ("hierarchical", "dynamic", 2),
                                                             ("dispatch_combine", "lp", 2)])
def test_static_one_segment_equals_simulate(two_traces: tuple[Path, Path], dataflow: str, dispatch: str,
                                            nodes: int) -> None:
    a, _ = two_traces
    cfg = {"stream": spec([(a, 8)], a), "step_tokens": 32,
           "policy": {"name": "static", "solver": "greedy"}, "topology": _topology_cfg(nodes),
           "replicas": 1, "dataflow": dataflow, "dispatch": dispatch, "migration": {"mode": "stop_the_world"}, "decision_cost": {}}
    stream, profile, policy, ctx = prepare(cfg)
    result = replay_stream(stream, profile, policy, ctx)
    v0 = result.versions[0]
    placement = Placement(v0.phy2log, ctx.topology.num_gpus, nodes, "greedy", extra={"num_experts": 8})
    served = stream.tokens_of(np.arange(8))  # the stream's 8 sampled steps, in order, as one trace
    _, _, metrics = run_simulation(placement, served, topology(nodes, 2), 32, dataflow, dispatch)
    assert result.metrics["rebalances"] == 0 and result.metrics["steps"] == metrics["num_steps"] == 8
    assert result.metrics["serve_time_s"] == pytest.approx(8 * metrics["layer_time_s"], rel=1e-9)
    assert result.metrics["speedup_vs_contiguous"] == pytest.approx(metrics["speedup_vs_contiguous"], rel=1e-9)


@pytest.mark.parametrize("preset", ["h800_2x8", "h200_2x8"])
def test_saved_steps_rescored_by_simulate_match_the_timeline(tmp_path: Path, preset: str) -> None:
    """save_steps: the static run's step times are moetuner-simulate's on steps.safetensors, step by step
    (the calibrated h800 preset too: concurrent links, FP8 scatter, the efficiency curve)."""
    from moetuner.online.stream_replay import write_outputs

    trace = save_trace(random_trace(512, 2, 32, 4, seed=3), tmp_path / "a.safetensors")
    for dataflow in ("dispatch_combine", "hierarchical"):
        out = tmp_path / dataflow
        cfg = {"stream": spec([(trace, 6)], trace), "step_tokens": 48, "policy": {"name": "static", "solver": "greedy"},
               "topology": topology_preset(preset), "replicas": 1, "dataflow": dataflow, "dispatch": "static",
               "migration": {"mode": "stop_the_world"}, "decision_cost": {}}
        stream, profile, policy, ctx = prepare(cfg)
        write_outputs(replay_stream(stream, profile, policy, ctx), stream, ctx, "t", out, save_steps=True)
        steps = load_trace(out / "steps.safetensors")
        assert steps.num_tokens == 6 * 48 and steps.extra["step_tokens"] == "48"
        _, _, metrics = run_simulation(load_placement(out / "placements" / "v0.json"), steps,
                                       topology_from_config(topology_preset(preset)), 48, dataflow, "static")
        timeline = np.loadtxt(out / "timeline.csv", delimiter=",", skiprows=1, usecols=3)
        np.testing.assert_allclose(metrics["step_times_s"], timeline, rtol=1e-6, atol=0)


def _topology_cfg(nodes: int) -> dict:
    return {"name": f"test_{nodes}x2", "nodes": nodes, "gpus_per_node": 2, "intra_node_bw_GBps": 450.0,
            "inter_node_bw_GBps": 50.0, "gpu_peak_tflops": 1.0, "hbm_bw_GBps": 1.0}


POLICY_CFGS = {
    "periodic": {"name": "periodic", "solver": "greedy", "interval_steps": 3, "window_steps": 2},
    "triggered": {"name": "triggered", "solver": "greedy", "window_steps": 2, "check_every": 2, "threshold": 1.01},
    "migration_aware": {"name": "migration_aware", "solver": "eplb", "window_steps": 3, "check_every": 2,
                        "horizon_steps": 1000, "min_gain": 0.0, "max_moves": 2},
}


@pytest.mark.parametrize("name", sorted(POLICY_CFGS))
def test_policies_never_read_future_steps(two_traces: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    a, b = two_traces
    c = save_trace(random_trace(256, 2, 8, 2, seed=7), tmp_path / "c.safetensors")
    runs = []
    for later in (b, c):  # the same first 10 steps, then different routing
        stream, profile = load_stream(spec([(a, 10), (later, 6)], a), 32)
        ctx = frozen(make_context(stream, topology(2, 2), 1, "dispatch_combine", "dynamic", MigrationConfig(), shipped_cost()))
        runs.append(replay_stream(stream, profile, make_policy(POLICY_CFGS[name], stream), ctx))
    early = [[(v.decided_step, v.phy2log.tolist()) for v in r.versions if v.decided_step <= 10] for r in runs]
    assert len(early[0]) > 1, "the policy made no decision in the first segment: the test shows nothing"
    assert early[0] == early[1]
    assert [r["step_time_s"] for r in runs[0].rows[:10]] == [r["step_time_s"] for r in runs[1].rows[:10]]


def test_served_refuses_unserved_steps(two_traces: tuple[Path, Path]) -> None:
    a, _ = two_traces
    stream, _ = load_stream(spec([(a, 4)], a), 32)
    served = Served(stream, 2)
    assert served.loads(served.window(5)).shape == (2, 2, 8)
    with pytest.raises(AssertionError, match="not served yet"):
        served.tokens(np.array([2]))


def test_align_layer_keeps_experts_in_place() -> None:
    current = np.array([0, 1, 2, 3, 4, 5, 6, 7])  # 4 GPUs of 2
    target = np.array([6, 7, 0, 2, 1, 3, 4, 5])  # the same sets except 1 <-> 2, GPUs relabelled
    aligned = align_layer(current, target, 4, 4)
    assert aligned.tolist() == [0, 2, 1, 3, 4, 5, 6, 7]
    # 2 nodes of 2 GPUs: target's node groups {1,4,0,2} | {3,5,6,7} stay together; inside, the unique
    # best match keeps 1 on GPU 0, 2 on GPU 1, 5 on GPU 2 and 6, 7 on GPU 3
    two_nodes = align_layer(current, np.array([1, 4, 0, 2, 3, 5, 6, 7]), 4, 2)
    assert two_nodes.tolist() == [4, 1, 2, 0, 3, 5, 6, 7]


def test_sticky_layer_moves_only_what_unbalances() -> None:
    from moetuner.online.migration_aware import sticky_layer

    current = np.array([0, 1, 2, 3])  # one node, 2 GPUs of 2 slots
    # balanced already (10 + 1 | 1 + 10 against a cap of 11 x 1.05): nothing moves
    def gpu_sets(row):
        return [sorted(row[:2]), sorted(row[2:])]

    assert gpu_sets(sticky_layer(current, np.array([10.0, 1, 1, 10]), 2, 2)) == [[0, 1], [2, 3]]
    # 10 + 10 on GPU 0: expert 1 goes to the lighter GPU, expert 3 takes its place (2 copies, the fewest)
    moved = sticky_layer(current, np.array([10.0, 10, 1, 1]), 2, 2)
    assert gpu_sets(moved) == [[0, 3], [1, 2]]
    assert align_layer(current, moved, 2, 2).tolist() == [0, 3, 2, 1]  # slots keep what stays


@pytest.mark.parametrize(("segments", "message"), [
    ([], "non-empty list"),
    ("a.safetensors", "non-empty list"),
    ([{"trace": "A", "steps": 0}], r"segments\[0\].steps=0; it must be an integer >= 1"),
    ([{"trace": "A"}], r"missing key\(s\) \['steps'\]"),
    ([{"trace": "A", "steps": 4, "step": 4}], r"unknown key\(s\) \['step'\]"),
    ([{"trace": "A", "mix": {"A": 1.0}, "steps": 4}], r"has \['trace', 'mix'\].*give exactly one"),
    ([{"mix": {"A": 0.7, "B": 0.2}, "steps": 4}], r"mix weights \[0.7, 0.2\] must be >= 0 and sum to 1"),
    ([{"mix": {"A": 1.5, "B": -0.5}, "steps": 4}], r"must be >= 0 and sum to 1"),
    ([{"ramp": ["A", "B", "A"], "steps": 4}], "a ramp names exactly 2 traces"),
    ([{"ramp": "A", "steps": 4}], "a ramp names exactly 2 traces"),
    ([{"trace": "nowhere.safetensors", "steps": 4}], "no such trace file"),
    ([{"trace": "A", "steps": 4}, {"trace": "OTHER", "steps": 4}], "different models"),
])
def test_bad_stream_specs_are_refused(two_traces: tuple[Path, Path], tmp_path: Path, segments, message) -> None:
    a, b = two_traces
    other = save_trace(random_trace(256, 2, 16, 2), tmp_path / "other.safetensors")
    names = {"A": str(a), "B": str(b), "OTHER": str(other)}

    def named(value):
        if isinstance(value, dict):
            return {names.get(k, k): v for k, v in value.items()}
        if isinstance(value, list):
            return [names.get(v, v) for v in value]
        return names.get(value, value)

    if isinstance(segments, list):
        segments = [{k: (named(v) if k != "steps" else v) for k, v in s.items()} for s in segments]
    with pytest.raises(StreamError, match=message):
        load_stream({"segments": segments, "profile": str(a), "split": SPLIT}, 32)


def test_stream_refuses_profile_sequences_and_bad_settings(two_traces: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_traces
    # the same file as profile and stream, not split: every sequence would be replayed in-sample
    with pytest.raises(StreamError, match=r"shares 16 sequence\(s\) with the profile.*stream.split"):
        load_stream(spec([(a, 4)], a, split=None), 32)
    # files split by moetuner-split's function: held-out vs profile is accepted, profile vs profile refused
    prof, held = split_by_sequence(load_trace(a), 0.5, 0)
    p_path, h_path = save_trace(prof, tmp_path / "p.safetensors"), save_trace(held, tmp_path / "h.safetensors")
    stream, profile = load_stream(spec([(h_path, 4), (b, 4)], p_path, split=None), 32)
    assert profile.num_tokens == prof.num_tokens and stream.num_steps == 8
    with pytest.raises(StreamError, match="shares 8 sequence"):
        load_stream(spec([(p_path, 4)], p_path, split=None), 32)
    for bad, message in (({"split": {"holdout_fraction": 1.5, "seed": 0}}, "holdout_fraction=1.5"),
                         ({"split": {"fraction": 0.5}}, "write {holdout_fraction: 0.5, seed: 0}"),
                         ({"draw_from": "future"}, "draw_from='future'"),
                         ({"sed": 1}, r"unknown key\(s\) \['sed'\]")):
        with pytest.raises(StreamError, match=message):
            load_stream({**spec([(a, 4)], a), **bad}, 32)
    with pytest.raises(StreamError, match="step_tokens=0"):
        load_stream(spec([(a, 4)], a), 0)


ESFT = Path(__file__).resolve().parents[1] / "data" / "esft"


def test_sampled_steps_never_repeat_one_batch_list() -> None:
    """Real routing (ESFT intent, shipped): 400 steps of 512 tokens from the held-out half."""
    intent = ESFT / "intent.safetensors"
    stream, profile = load_stream(spec([(intent, 400)], intent, seed=5), 512)
    steps = [tuple(row) for row in stream.step_index.tolist()]
    assert len(set(steps)) == 400  # no step is served twice, so no fixed list of steps is replayed in a loop
    whole = load_trace(intent)
    prof, held = split_by_sequence(whole, 0.5, 0)
    drawn = np.unique(stream.pool_seq[stream.step_index])
    assert set(drawn) <= set(held.sequences) and not set(drawn) & set(profile.sequences)
    assert len(drawn) == len(held.sequences)  # with 400 x ~8 draws every held-out sequence recurs
    # tokens are whole sequences in order, cut only at step boundaries
    flat = stream.step_index.ravel()
    seq = stream.pool_seq[flat]
    starts = np.flatnonzero(np.r_[True, (np.diff(flat) != 1) | (seq[1:] != seq[:-1])])  # one run per drawn sequence
    lengths = np.diff(np.r_[starts, len(flat)])
    seq_len = dict(zip(*np.unique(held.seq_ids, return_counts=True)))
    inner = [i for i, st in enumerate(starts) if st % 512 and (st + lengths[i]) % 512]  # runs no boundary cuts
    assert inner and all(lengths[i] == seq_len[stream.pool_seq[flat[starts[i]]]] for i in inner)
    assert np.array_equal(load_stream(spec([(intent, 400)], intent, seed=5), 512)[0].step_index, stream.step_index)
    assert not np.array_equal(load_stream(spec([(intent, 400)], intent, seed=6), 512)[0].step_index,
                              stream.step_index)


def test_mix_and_ramp_draw_their_domains(two_traces: tuple[Path, Path]) -> None:
    a, b = two_traces
    only_a, _ = load_stream(spec([{"mix": {str(a): 1.0, str(b): 0.0}, "steps": 50}], a), 32)
    assert set(only_a.pool_source[only_a.step_index].ravel()) == {only_a.paths.index(str(a))}
    ramp, _ = load_stream(spec([{"ramp": [str(a), str(b)], "steps": 200}], a), 32)
    from_b = ramp.pool_source[ramp.step_index] == ramp.paths.index(str(b))  # [S, B]
    assert not from_b[0, 0]  # B's weight is 0 at the start
    assert from_b[:40].mean() < 0.2 and from_b[-40:].mean() > 0.8  # expected 0.1 and 0.9
    assert ramp.segments[0].label == "a->b"


@dataclass
class SlowSwitch(SwitchAt):
    """SwitchAt whose decision at `at` counts `units` of work (`test_units`, priced by the context)."""

    units: float = 0.0

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        if step == self.at:
            ctx.work["test_units"] += self.units
        return super().decide(ctx, step, served, current)


def test_decision_takes_effect_after_its_charged_time(tmp_path: Path) -> None:
    # every token routes to experts (0, 1) in both layers: every step is the same, so its time T is constant
    ids = np.tile(np.array([[0, 1], [0, 1]]), (256, 1, 1))
    from test_solvers import make_trace

    path = save_trace(make_trace(ids, 8), tmp_path / "same.safetensors")
    stream, profile = load_stream(spec([(path, 12)], path), 32)
    first = np.tile(np.arange(8), (2, 1))
    new = first.copy()
    new[:, [1, 4]] = new[:, [4, 1]]  # experts 0 and 1 on different GPUs: a different (faster) step
    for mode in ("stop_the_world", "overlapped"):
        ctx = make_context(stream, topology(1, 2), 0, "dispatch_combine", "dynamic", MigrationConfig(mode, 0.5),
                           DecisionCost({"test_units": 1.0}))
        T = ctx.step_times.step(first, 0)[1]
        ctx.decision_cost = DecisionCost({"test_units": T})  # a unit of work costs one step
        assert ctx.step_times.times(first, np.arange(12)).step_s == pytest.approx(np.full(12, T))
        result = replay_stream(stream, profile, SlowSwitch(first, new, 3, units=2.5), ctx)
        v1 = result.versions[1]
        assert (v1.decided_step, v1.delay_steps, v1.decision_seconds) == (3, 3, 2.5 * T)
        assert result.metrics["decision_delay_steps"] == 3.0
        T_new = ctx.step_times.step(new, 0)[1]
        steps = [r["step_time_s"] for r in result.rows]
        if mode == "stop_the_world":  # decided before step 3, acts before step 3 + ceil(2.5) = 6
            assert v1.effective_step == 6 and result.rows[6]["wait_s"] > 0
            assert steps == pytest.approx([T] * 6 + [T_new] * 6)
        else:  # the transfers start before step 6 and run beside it and the steps after
            assert v1.effective_step > 6 and all(r["placement_version"] == 0 for r in result.rows[:7])
            assert steps[:6] == pytest.approx([T] * 6) and steps[6] > T


MEASURED = ("replay_wall_s", "initial_solve_seconds", "solve_seconds_per_rebalance", "solve_seconds_max")  # reported only


def test_replays_under_cpu_load_are_identical(two_traces: tuple[Path, Path]) -> None:
    # decision time is the counted work x a cost per unit, not a clock: two busy processes change nothing
    a, b = two_traces
    stream, profile = load_stream(spec([(a, 10), (b, 10)], a), 32)
    # the shipped unit costs / 1000: this toy's steps take microseconds, its decisions then a few steps
    cost = DecisionCost({unit: seconds * 1e-3 for unit, seconds in shipped_cost().per_unit.items()})

    def replays() -> dict:
        out = {}
        for name in ("periodic", "triggered", "migration_aware"):
            ctx = make_context(stream, topology(2, 2), 1, "dispatch_combine", "dynamic", MigrationConfig(), cost)
            got = replay_stream(stream, profile, make_policy({**POLICY_CFGS[name], "solver": "eplb"}, stream), ctx)
            out[name] = ({k: v for k, v in got.metrics.items() if k not in MEASURED},
                         [(v.decided_step, v.effective_step, v.delay_steps, v.decision_seconds, v.phy2log.tolist())
                          for v in got.versions])
        return out

    quiet = replays()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = replays()
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert quiet == loaded
    charged = [d for _, versions in quiet.values() for _, _, d, _, _ in versions[1:]]
    assert charged and min(charged) > 0, "no decision was charged a delay: the test shows nothing"


def test_decision_cost_by_hand_and_bad_configs_refused() -> None:
    cost = DecisionCost.from_config({"priced_layer_steps": 1e-6, "migration_layers": 0.5, "solve_layers": {"eplb": 2.0},
                                     "measured_by": "a command"})
    assert cost.seconds({"priced_layer_steps": 1000, "migration_layers": 3, "solve_layers.eplb": 2}) == \
        pytest.approx(1e-3 + 1.5 + 4.0)
    with pytest.raises(DecisionCostError, match=r"no cost for \['solve_layers.greedy'\]; measure it with "
                                                r"benchmarks/decision_cost.py"):
        cost.seconds({"solve_layers.greedy": 26})
    with pytest.raises(DecisionCostError, match=r"no cost for \['solve_layers.exflow'\]"):
        cost.check_solver("exflow")
    with pytest.raises(DecisionCostError, match="decision_cost.wall_s: unknown unit"):
        DecisionCost.from_config({"wall_s": 1.0})
    with pytest.raises(DecisionCostError, match="migration_layers=-1; seconds per unit, a number >= 0"):
        DecisionCost.from_config({"migration_layers": -1})


def test_bad_policy_and_migration_are_refused(two_traces: tuple[Path, Path]) -> None:
    a, _ = two_traces
    stream, _ = load_stream(spec([(a, 4)], a), 32)
    with pytest.raises(PolicyError, match="choose one of"):
        make_policy({"name": "sometimes"}, stream)
    with pytest.raises(PolicyError, match=r"policy.interval_steps=0"):
        make_policy({"name": "periodic", "interval_steps": 0, "window_steps": 2}, stream)
    with pytest.raises(PolicyError, match=r"unknown key\(s\) \['windw_steps'\]"):
        make_policy({"name": "periodic", "interval_steps": 3, "windw_steps": 2}, stream)
    with pytest.raises(MigrationError, match="choose one of"):
        MigrationConfig.from_config({"mode": "later"})


APP = [sys.executable, "-c", "from moetuner.apps.online import main; main()"]


@pytest.mark.slow
def test_app_writes_outputs_and_refuses_bad_spec_first(two_traces: tuple[Path, Path], tmp_path: Path,
                                                       mlflow_uri: str) -> None:
    a, b = two_traces
    topo = ["topology.name=t1x4", "topology.gpus_per_node=4"]
    out = tmp_path / "run"
    ok = subprocess.run([*APP, f"stream.segments=[{{trace:{a},steps:4}},{{trace:{b},steps:4}}]",
                         f"stream.profile={a}", "step_tokens=32", "policy=migration_aware", "policy.check_every=2",
                         "policy.window_steps=2", *topo, f"out={out}", "save_steps=true"],
                        capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["total_time_s"] > 0 and "decision_delay_steps" in metrics
    rows = (out / "timeline.csv").read_text().splitlines()
    assert rows[0] == "step,segment,trace,step_time_s,placement_version,wait_s,contiguous_step_time_s,peak_to_average"
    assert len(rows) == 9 and rows[5].split(",")[2] == "b"
    v0 = load_placement(out / "placements" / "v0.json")
    assert v0.extra["effective_step"] == 0 and v0.phy2log.shape == (2, 8)
    assert len(list((out / "placements").glob("v*.json"))) == metrics["rebalances"] + 1
    assert (out / "speedup_timeline.png").stat().st_size > 0
    assert load_trace(out / "steps.safetensors").num_tokens == 8 * 32  # the served steps, in order
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("moetuner").experiment_id])
    assert run.data.tags["app"] == "online" and run.data.tags["policy"] == "migration_aware"
    assert run.data.metrics["total_time_s"] == pytest.approx(metrics["total_time_s"])
    bad = subprocess.run([*APP, f"stream.segments=[{{trace:{a},steps:-1}}]", f"stream.profile={a}", "step_tokens=32",
                          *topo, f"out={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=300,
                         env=os.environ.copy())
    assert bad.returncode != 0 and "steps=-1; it must be an integer >= 1" in bad.stderr
    assert not (tmp_path / "bad" / "metrics.json").exists()
    unpriced = subprocess.run([*APP, f"stream.segments=[{{trace:{a},steps:4}}]", f"stream.profile={a}", "step_tokens=32",
                               "policy=periodic", "policy.solver=exflow", *topo, f"out={tmp_path / 'unpriced'}"],
                              capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert unpriced.returncode != 0 and "no cost for ['solve_layers.exflow']" in unpriced.stderr
    assert not (tmp_path / "unpriced" / "metrics.json").exists()


def test_report_section_reads_every_replay(two_traces: tuple[Path, Path], tmp_path: Path) -> None:
    from moetuner.online.stream_replay import write_outputs
    from moetuner.report.online_section import online_runs, online_section

    a, b = two_traces
    assert online_section(tmp_path / "results", tmp_path / "report") is None  # no replay: no section
    stream, profile = load_stream(spec([(a, 4), (b, 4)], a), 32)
    ctx = frozen(make_context(stream, topology(1, 2), 0, "dispatch_combine", "dynamic", MigrationConfig(), shipped_cost()))
    totals = {}
    for name, cfg in (("static", {"name": "static", "solver": "greedy"}),
                      ("static_eplb", {"name": "static", "solver": "eplb"}), ("periodic", POLICY_CFGS["periodic"]),
                      ("oracle", {"name": "oracle", "solvers": ["greedy", "eplb"]})):
        result = replay_stream(stream, profile, make_policy(cfg, stream), ctx)
        totals[name] = result.metrics["total_time_s"]
        write_outputs(result, stream, ctx, name, tmp_path / "results" / "online" / "a-b" / "test_1x2-r0" / name)
    table = online_runs(tmp_path / "results").set_index("policy")
    assert sorted(table.index) == ["oracle", "periodic", "static", "static_eplb"]
    best = min(totals["static"], totals["static_eplb"])
    assert table.loc["periodic"].vs_best_static == pytest.approx(totals["periodic"] / best)
    if best > totals["oracle"]:
        assert table.loc["periodic"].captured == pytest.approx((best - totals["periodic"]) / (best - totals["oracle"]))
        assert table.loc["oracle"].captured == pytest.approx(1.0)
    else:  # the oracle gains nothing over the best static placement: nothing to capture
        assert np.isnan(table.loc["periodic"].captured)
    section = online_section(tmp_path / "results", tmp_path / "report")
    assert section.title == "Online rebalancing" and "| a-b | test_1x2-r0 | static |" in section.markdown
    assert section.figures[0].path.name == "online_timeline.png" and section.figures[0].path.stat().st_size > 0


@pytest.mark.parametrize("mode", ["stop_the_world", "overlapped"])
def test_overhead_and_redeployment_metrics_by_hand(two_traces: tuple[Path, Path], mode: str) -> None:
    a, _ = two_traces
    stream, profile = load_stream(spec([(a, 12)], a), 32)
    config = MigrationConfig(mode, 0.25, overhead_s=0.5)
    ctx = frozen(make_context(stream, topology(1, 2), 0, "dispatch_combine", "dynamic", config, shipped_cost()))
    first = np.tile(np.arange(8), (2, 1))
    new = first.copy()
    new[0, [1, 4]] = new[0, [4, 1]]
    result = replay_stream(stream, profile, SwitchAt(first, new, 3), ctx)
    link_s = ctx.migration_of(first, new).duration_s() if mode == "stop_the_world" else 0.0
    m = result.metrics
    assert m["migration_time_s"] == pytest.approx(link_s + 0.5)  # the transfers (stop the world) + the overhead
    assert m["migration_share"] == pytest.approx(m["migration_time_s"] / m["total_time_s"])
    assert m["slots_changed_per_rebalance"] == 2 and m["rebalances"] == 1
    # peak-to-average by hand: GPU 0 holds experts 0-3, GPU 1 experts 4-7 (layer 0: 0,4,2,3 | 1,5,6,7 after the switch)
    for row in result.rows:
        layout = first if row["placement_version"] == 0 else new
        load = stream.loads[row["step"]].astype(float)  # [L, E]
        per_gpu = np.stack([[load[l, layout[l, :4]].sum(), load[l, layout[l, 4:]].sum()] for l in range(2)])
        assert row["peak_to_average"] == pytest.approx(float((per_gpu.max(1) / per_gpu.mean(1)).mean()))
    assert m["peak_to_average_load"] == pytest.approx(np.mean([r["peak_to_average"] for r in result.rows]))
    with pytest.raises(MigrationError, match="overhead_s=-1.0"):
        MigrationConfig.from_config({"overhead_s": -1})


def test_periodic_phase_offset_is_honoured(two_traces: tuple[Path, Path]) -> None:
    a, _ = two_traces
    stream, _ = load_stream(spec([(a, 14)], a), 32)
    ctx = frozen(make_context(stream, topology(1, 2), 0, "dispatch_combine", "dynamic", MigrationConfig(), shipped_cost()))
    current = np.tile(np.arange(8), (2, 1))
    for offset, expected in ((0, [4, 8, 12]), (1, [1, 5, 9, 13]), (3, [3, 7, 11])):
        policy = make_policy({**POLICY_CFGS["periodic"], "interval_steps": 4, "phase_offset_steps": offset}, stream)
        asked = [s for s in range(1, 14) if policy.decide(ctx, s, Served(stream, s), current) is not None]
        assert asked == expected
    with pytest.raises(PolicyError, match="phase_offset_steps=4; it must be below interval_steps=4"):
        make_policy({**POLICY_CFGS["periodic"], "interval_steps": 4, "phase_offset_steps": 4}, stream)


ORACLE_SOLVERS = ["eplb", "greedy", "round_robin"]


@pytest.mark.parametrize("overhead_s", [0.0, 10.0])
def test_oracle_is_never_slower_than_any_static_placement(two_traces: tuple[Path, Path], overhead_s: float) -> None:
    a, b = two_traces
    for segments in ([(a, 6)], [(b, 6)], [(a, 5), (b, 7)]):  # each domain as one segment, then both
        stream, profile = load_stream(spec(segments, a), 32)
        ctx = frozen(make_context(stream, topology(2, 2), 1, "dispatch_combine", "dynamic",
                                  MigrationConfig(overhead_s=overhead_s), shipped_cost()))
        static = {s: replay_stream(stream, profile, make_policy({"name": "static", "solver": s}, stream), ctx)
                  for s in ORACLE_SOLVERS}
        oracle = make_policy({"name": "oracle", "solvers": ORACLE_SOLVERS}, stream)
        got = replay_stream(stream, profile, oracle, ctx).metrics
        assert got["total_time_s"] == pytest.approx(oracle.predicted_s)  # the programme prices what the replay charges
        for s, run in static.items():
            assert got["total_time_s"] <= run.metrics["total_time_s"] * (1 + 1e-12), s
        if overhead_s == 10.0:  # no switch can pay for 10 s here: one placement throughout
            assert got["rebalances"] == 0


def test_bad_oracle_configs_are_refused(two_traces: tuple[Path, Path]) -> None:
    a, _ = two_traces
    stream, _ = load_stream(spec([(a, 4)], a), 32)
    with pytest.raises(PolicyError, match="policy.solvers=None; give a non-empty list"):
        make_policy({"name": "oracle"}, stream)
    with pytest.raises(PolicyError, match=r"unknown key\(s\) \['solver'\]"):
        make_policy({"name": "oracle", "solver": "eplb", "solvers": ["eplb"]}, stream)
    with pytest.raises(PolicyError, match=r"\['steptail'\]; oracle's options are per solver"):
        make_policy({"name": "oracle", "solvers": ["eplb"], "solver_options": {"steptail": {}}}, stream)


def test_benchmark_aims_measure_from_the_best_static_by_hand() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import online_rebalance as bench

    totals = {"static[eplb]": 10.0, "static[steptail]": 9.0, "periodic[+0]": 11.0, "periodic[+750]": 12.0,
              "migration_aware": 8.5, "oracle": 8.0}
    rows = [{"stream": "s", "setting": "t", "mode": "m", "overhead_s": 0.0, "seed": seed, "policy": p,
             "total_time_s": t + (0.5 * seed if p == "migration_aware" else 0.0), "experts_moved": {"periodic[+0]": 30, "periodic[+750]": 50}.get(p, 10),
             "migration_share": 0.01, "bytes_moved": 1.0, "peak_to_average_load": 1.2,
             "slots_changed_per_rebalance": 3.0, "decision_delay_steps": 5.0} for seed in (0, 1)
            for p, t in totals.items()]
    table = bench.aims(rows)
    first = table[0]
    assert first["best_static"] == "static[steptail]" and first["best_static_s"] == 9.0
    assert first["oracle_gain"] == pytest.approx(1 / 9) and first["ma_gain"] == pytest.approx(0.5 / 9)
    assert first["captured"] == pytest.approx(0.5)
    assert first["ma_vs_periodic_min"] == pytest.approx(1 - 8.5 / 11)  # the nearest periodic offset
    assert first["moved_vs_periodic"] == pytest.approx(10 / 40)
    summary = bench.summary(rows, table)[0]
    assert summary["seeds"] == 2
    assert (summary["captured_min"], summary["captured_mean"], summary["captured_max"]) == pytest.approx((0.0, 0.25, 0.5))
    assert summary["ranking"].split(" < ") == ["oracle", "migration_aware", "static[steptail]", "static[eplb]",
                                               "periodic[+0]", "periodic[+750]"]
    docs = bench.docs_table(table)[0]  # 'mean [min, max]' over the two seeds
    assert docs["captured %"] == "25.00 [0.00, 50.00]" and docs["best static"] == "static[steptail] x2"
    assert docs["moved / periodic"] == "0.25 [0.25, 0.25]" and docs["overhead_ms"] == "0"
    for row in rows:
        row["rebalances"] = 2
    ma = next(r for r in bench.policy_table(rows) if r["policy"] == "migration_aware")
    assert ma["total s"] == "8.7500 [8.5000, 9.0000]" and ma["experts moved"] == "10" and ma["rebalances"] == "2.0"
