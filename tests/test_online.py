"""moetuner-online: migration cost by hand, static replay == moetuner-simulate, no peeking, bad specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from moetuner.apps.online import prepare
from moetuner.costmodel.evaluate import run_simulation
from moetuner.online.migration import (MigrationConfig, MigrationError, expert_bytes, plan_migration, transfers)
from moetuner.online.migration_aware import align_layer
from moetuner.online.policies import Context, Decision, PolicyError, Served
from moetuner.online.policy_config import make_policy
from moetuner.online.stream_replay import make_context, replay_stream
from moetuner.online.stream import StreamError, load_stream
from moetuner.placement import Placement, load_placement
from moetuner.costmodel.cost import CostModel
from moetuner.trace import Trace, save_trace
from test_solvers import random_trace, topology

INF = np.inf


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


@pytest.fixture
def two_traces(tmp_path: Path) -> tuple[Path, Path]:
    """Two 'domains' of one model: 8 experts, 2 layers, top-2, 256 tokens (8 steps of 32)."""
    return (save_trace(random_trace(256, 2, 8, 2, seed=1), tmp_path / "a.safetensors"),
            save_trace(random_trace(256, 2, 8, 2, seed=2), tmp_path / "b.safetensors"))


@pytest.mark.parametrize("mode", ["stop_the_world", "overlapped"])
def test_replay_charges_migrations_by_hand(two_traces: tuple[Path, Path], mode: str) -> None:
    a, _ = two_traces
    stream, profile = load_stream([{"trace": str(a), "steps": 12}], str(a), 32)
    topo = topology(1, 2)
    ctx = make_context(stream, topo, 0, "dispatch_combine", "dynamic", MigrationConfig(mode, 0.25))
    first = np.tile(np.arange(8), (2, 1))
    new = first.copy()
    new[0, [1, 4]] = new[0, [4, 1]]  # one expert each way in layer 0
    result = replay_stream(stream, profile, SwitchAt(first, new, 3), ctx)
    mig = ctx.migration_of(first, new)
    assert mig.experts_moved == 2 and mig.rounds == 1
    per_expert = expert_bytes(8, 8)
    assert mig.duration_s() == pytest.approx(per_expert / 450e9)  # no latency in this topology
    keys, times = stream.keys(), ctx.step_times
    old_t = [times.get(first, k) for k in keys]
    new_t = [times.get(new, k) for k in keys]
    steps = [r["step_time_s"] for r in result.rows]
    if mode == "stop_the_world":
        assert result.metrics["migration_time_s"] == pytest.approx(mig.duration_s())
        assert result.versions[1].effective_step == 3
        assert steps == pytest.approx([t.step_s for t in old_t[:3]] + [t.step_s for t in new_t[3:]])
    else:
        assert result.metrics["migration_time_s"] == 0.0
        slowed = [t.compute_s.sum() + t.a2a_s.sum() / 0.75 for t in old_t]
        left, step = mig.duration_s(0.25), 3  # the transfers run beside steps 3, 4, ... until done
        while left > 0:
            left -= slowed[step]
            step += 1
        assert result.versions[1].effective_step == step
        expected = [t.step_s for t in old_t[:3]] + slowed[3:step] + [t.step_s for t in new_t[step:]]
        assert steps == pytest.approx(expected)
    assert result.metrics["total_time_s"] == pytest.approx(sum(steps) + result.metrics["migration_time_s"])
    assert result.metrics["experts_moved"] == 2 and result.metrics["bytes_moved"] == 2 * per_expert


@pytest.mark.parametrize(("dataflow", "dispatch", "nodes"), [("dispatch_combine", "dynamic", 1),
                                                             ("expert_to_expert", "static", 1),
                                                             ("hierarchical", "dynamic", 2),
                                                             ("dispatch_combine", "lp", 2)])
def test_static_one_segment_equals_simulate(two_traces: tuple[Path, Path], dataflow: str, dispatch: str,
                                            nodes: int) -> None:
    a, _ = two_traces
    cfg = {"stream": {"segments": [{"trace": str(a), "steps": 8}]}, "profile": str(a), "step_tokens": 32,
           "policy": {"name": "static", "solver": "greedy"}, "topology": _topology_cfg(nodes),
           "replicas": 1, "dataflow": dataflow, "dispatch": dispatch, "migration": {"mode": "stop_the_world"}}
    stream, profile, policy, ctx = prepare(cfg)
    result = replay_stream(stream, profile, policy, ctx)
    v0 = result.versions[0]
    placement = Placement(v0.phy2log, ctx.topology.num_gpus, nodes, "greedy", extra={"num_experts": 8})
    _, _, metrics = run_simulation(placement, profile, topology(nodes, 2), 32, dataflow, dispatch)
    assert result.metrics["rebalances"] == 0 and result.metrics["steps"] == metrics["num_steps"] == 8
    assert result.metrics["serve_time_s"] == pytest.approx(8 * metrics["layer_time_s"], rel=1e-9)
    assert result.metrics["speedup_vs_contiguous"] == pytest.approx(metrics["speedup_vs_contiguous"], rel=1e-9)


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
        stream, profile = load_stream([{"trace": str(a), "steps": 10}, {"trace": str(later), "steps": 6}], str(a), 32)
        ctx = make_context(stream, topology(2, 2), 1, "dispatch_combine", "dynamic", MigrationConfig())
        runs.append(replay_stream(stream, profile, make_policy(POLICY_CFGS[name], stream), ctx))
    early = [[(v.decided_step, v.phy2log.tolist()) for v in r.versions if v.decided_step <= 10] for r in runs]
    assert len(early[0]) > 1, "the policy made no decision in the first segment: the test shows nothing"
    assert early[0] == early[1]
    assert [r["step_time_s"] for r in runs[0].rows[:10]] == [r["step_time_s"] for r in runs[1].rows[:10]]


def test_served_refuses_unserved_steps(two_traces: tuple[Path, Path]) -> None:
    a, _ = two_traces
    stream, _ = load_stream([{"trace": str(a), "steps": 4}], str(a), 32)
    served = Served(stream, stream.keys()[:2])
    assert served.loads(served.window(5)).shape == (2, 2, 8)
    with pytest.raises(AssertionError, match="not served yet"):
        served.tokens(stream.keys()[2:3])


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
    ([{"trace": "nowhere.safetensors", "steps": 4}], "no such trace file"),
    ([{"trace": "A", "steps": 4}, {"trace": "OTHER", "steps": 4}], "different models"),
])
def test_bad_stream_specs_are_refused(two_traces: tuple[Path, Path], tmp_path: Path, segments, message) -> None:
    a, _ = two_traces
    other = save_trace(random_trace(256, 2, 16, 2), tmp_path / "other.safetensors")
    names = {"A": str(a), "OTHER": str(other)}
    if isinstance(segments, list):
        segments = [{**s, "trace": names.get(s.get("trace"), s.get("trace"))} if "trace" in s else s for s in segments]
    with pytest.raises(StreamError, match=message):
        load_stream(segments, str(a), 32)
    with pytest.raises(StreamError, match="fewer than step_tokens=512"):
        load_stream([{"trace": str(a), "steps": 4}], str(a), 512)


def test_bad_policy_and_migration_are_refused(two_traces: tuple[Path, Path]) -> None:
    a, _ = two_traces
    stream, _ = load_stream([{"trace": str(a), "steps": 4}], str(a), 32)
    with pytest.raises(PolicyError, match="choose one of"):
        make_policy({"name": "sometimes"}, stream)
    with pytest.raises(PolicyError, match=r"policy.interval_steps=0"):
        make_policy({"name": "periodic", "interval_steps": 0, "window_steps": 2}, stream)
    with pytest.raises(PolicyError, match=r"unknown key\(s\) \['windw_steps'\]"):
        make_policy({"name": "periodic", "interval_steps": 3, "windw_steps": 2}, stream)
    with pytest.raises(MigrationError, match="choose one of"):
        MigrationConfig.from_config({"mode": "later"})


APP = [sys.executable, "-c", "from moetuner.apps.online import main; main()"]


def test_app_writes_outputs_and_refuses_bad_spec_first(two_traces: tuple[Path, Path], tmp_path: Path,
                                                       mlflow_uri: str) -> None:
    a, b = two_traces
    topo = ["topology.name=t1x4", "topology.gpus_per_node=4"]
    out = tmp_path / "run"
    ok = subprocess.run([*APP, f"stream.segments=[{{trace:{a},steps:4}},{{trace:{b},steps:4}}]",
                         f"profile={a}", "step_tokens=32", "policy=migration_aware", "policy.check_every=2",
                         "policy.window_steps=2", *topo, f"out={out}"],
                        capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["total_time_s"] > 0
    rows = (out / "timeline.csv").read_text().splitlines()
    assert rows[0] == "step,segment,trace,step_time_s,placement_version,wait_s,contiguous_step_time_s"
    assert len(rows) == 9 and rows[5].split(",")[2] == "b"
    v0 = load_placement(out / "placements" / "v0.json")
    assert v0.extra["effective_step"] == 0 and v0.phy2log.shape == (2, 8)
    assert len(list((out / "placements").glob("v*.json"))) == metrics["rebalances"] + 1
    assert (out / "speedup_timeline.png").stat().st_size > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("moetuner").experiment_id])
    assert run.data.tags["app"] == "online" and run.data.tags["policy"] == "migration_aware"
    assert run.data.metrics["total_time_s"] == pytest.approx(metrics["total_time_s"])
    bad = subprocess.run([*APP, f"stream.segments=[{{trace:{a},steps:-1}}]", f"profile={a}", "step_tokens=32",
                          *topo, f"out={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=300,
                         env=os.environ.copy())
    assert bad.returncode != 0 and "steps=-1; it must be an integer >= 1" in bad.stderr
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_report_section_reads_every_replay(two_traces: tuple[Path, Path], tmp_path: Path) -> None:
    from moetuner.online.stream_replay import write_outputs
    from moetuner.report.online_section import online_runs, online_section

    a, b = two_traces
    assert online_section(tmp_path / "results", tmp_path / "report") is None  # no replay: no section
    stream, profile = load_stream([{"trace": str(a), "steps": 4}, {"trace": str(b), "steps": 4}], str(a), 32)
    ctx = make_context(stream, topology(1, 2), 0, "dispatch_combine", "dynamic", MigrationConfig())
    totals = {}
    for name, cfg in (("static", {"name": "static", "solver": "greedy"}), ("periodic", POLICY_CFGS["periodic"])):
        result = replay_stream(stream, profile, make_policy(cfg, stream), ctx)
        totals[name] = result.metrics["total_time_s"]
        write_outputs(result, stream, ctx, name, tmp_path / "results" / "online" / "a-b" / "test_1x2-r0" / name)
    table = online_runs(tmp_path / "results")
    assert sorted(table.policy) == ["periodic", "static"]
    row = table.set_index("policy").loc["periodic"]
    assert row.vs_static == pytest.approx(totals["periodic"] / totals["static"])
    section = online_section(tmp_path / "results", tmp_path / "report")
    assert section.title == "Online rebalancing" and "| a-b | test_1x2-r0 | static |" in section.markdown
    assert section.figures[0].path.name == "online_timeline.png" and section.figures[0].path.stat().st_size > 0
