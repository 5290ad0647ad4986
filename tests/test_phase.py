"""Phases (moetuner/phase.py): how prefill and decode steps are built from a trace, and that `phase=` reaches
moetuner-solve's problem and moetuner-simulate's scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from moetuner import CONF_DIR
from moetuner.apps.solve import problem_from_config
from moetuner.phase import Phase, PhaseError, decode_order, phase_from_config, phase_trace, prefill_order
from moetuner.placement import save_placement
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
from moetuner.trace import save_trace
from test_simulate_app import run_app as run_simulate
from test_solvers import random_trace, topology

# 4 sequences: 0 has tokens 0-2, 1 has 3-4, 2 has 5-8, 3 has 9
SEQ = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
TOKENS_OF = {0: {0, 1, 2}, 1: {3, 4}, 2: {5, 6, 7, 8}, 3: {9}}


def config(app: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(app, overrides=list(overrides))


def test_decode_step_one_token_per_sequence_while_enough_sequences() -> None:
    order = decode_order(SEQ, 3, 5, seed=0)
    assert order.shape == (15,)
    for step in order.reshape(5, 3):
        assert len(set(SEQ[step])) == 3  # 3 tokens of 3 distinct sequences


def test_decode_step_with_more_tokens_than_sequences() -> None:
    # batch 6 over 4 sequences: every sequence once, two of them twice, at distinct positions (sequence 3 has one
    # token, so asked twice it gives that token twice)
    for step in decode_order(SEQ, 6, 20, seed=1).reshape(20, 6):
        counts = np.bincount(SEQ[step], minlength=4)
        assert sorted(counts.tolist()) == [1, 1, 2, 2]
        for seq in range(3):
            picked = step[SEQ[step] == seq]
            assert set(picked) <= TOKENS_OF[seq] and len(set(picked)) == len(picked)  # distinct positions
    # batch 12: every sequence 3 times; sequence 1 (2 tokens) gives both once and one again, sequence 3 its token x3
    step = decode_order(SEQ, 12, 1, seed=2)
    assert np.bincount(SEQ[step], minlength=4).tolist() == [3, 3, 3, 3]
    assert sorted(step[SEQ[step] == 0].tolist()) == [0, 1, 2] and step[SEQ[step] == 3].tolist() == [9, 9, 9]
    assert sorted(set(step[SEQ[step] == 1].tolist())) == [3, 4]


def test_decode_draws_are_seeded() -> None:
    seq = np.repeat(np.arange(50), 7)
    assert np.array_equal(decode_order(seq, 16, 4, seed=3), decode_order(seq, 16, 4, seed=3))
    assert not np.array_equal(decode_order(seq, 16, 4, seed=3), decode_order(seq, 16, 4, seed=4))


def test_prefill_keeps_whole_sequences_in_order_then_recurs() -> None:
    assert prefill_order(SEQ, 8, seed=0).tolist() == list(range(8))  # the trace in order: today's windows
    order = prefill_order(SEQ, 25, seed=0)
    assert order[:10].tolist() == list(range(10))
    second = order[10:20]  # one more pass: the 4 sequences whole, each contiguous and in order, permuted
    assert sorted(second.tolist()) == list(range(10))
    starts = [int(np.flatnonzero(second == min(TOKENS_OF[s]))[0]) for s in range(4)]
    assert all(second[a:a + len(TOKENS_OF[s])].tolist() == sorted(TOKENS_OF[s]) for s, a in enumerate(starts))


def test_phase_trace_shapes_dataflow_and_step_tokens() -> None:
    trace = random_trace(320, 3, 8, 2, seed=4)  # sequences of 16 tokens: 20 sequences
    decode = Phase("decode", 2, "low_latency", num_steps=5, seed=0)
    topo = topology(2, 2)
    steps = phase_trace(trace, decode, topo)
    assert steps.topk_ids.shape == (5 * 8, 3, 2) and decode.step_tokens(topo) == 8
    for window in steps.seq_ids.reshape(5, 8):
        assert len(set(window.tolist())) == 8  # 20 sequences >= 8: one token per sequence
    prefill = Phase("prefill", 24, "normal", num_steps=None)  # 96-token steps: the 320 tokens hold 3 whole steps
    assert np.array_equal(phase_trace(trace, prefill, topo).topk_ids, trace.topk_ids[:288])
    assert prefill.dataflow_on(topo) == "hierarchical" and prefill.dataflow_on(topology(1, 4)) == "dispatch_combine"
    assert decode.dataflow_on(topo) == "low_latency"


def test_phase_errors() -> None:
    with pytest.raises(PhaseError, match="unknown phase 'serve'; choose one of"):
        Phase("serve", 128, "low_latency")
    with pytest.raises(PhaseError, match="dataflow"):
        Phase("decode", 128, "pipelined")
    with pytest.raises(PhaseError, match="holds 320 tokens, less than one step of 16384; give phase.num_steps"):
        phase_trace(random_trace(320, 3, 8, 2), Phase("prefill", 4096, "normal", None), topology(1, 4))
    with pytest.raises(MissingConfigException, match="Could not find 'phase/serve'"):
        config("solve", "trace=x", "out=y", "phase=serve")


def test_phase_overrides_reach_the_solver(tmp_path: Path) -> None:
    path = save_trace(random_trace(320, 3, 8, 2, seed=4), tmp_path / "t.safetensors")
    plain = problem_from_config(config("solve", f"trace={path}", "out=y", "topology=cpu_2x2"))
    assert plain.step_tokens == 4096 and plain.dataflow == "dispatch_combine" and plain.profile.num_tokens == 320
    cfg = config("solve", f"trace={path}", "out=y", "topology=cpu_2x2", "phase=decode", "phase.tokens_per_rank=3")
    problem = problem_from_config(cfg)
    assert phase_from_config(cfg.phase) == Phase("decode", 3, "low_latency", 16, 0)
    assert problem.step_tokens == 12 and problem.dataflow == "low_latency" and problem.profile.num_tokens == 16 * 12
    prefill = problem_from_config(config("solve", f"trace={path}", "out=y", "topology=cpu_2x2", "phase=prefill",
                                         "phase.tokens_per_rank=16"))
    assert prefill.dataflow == "hierarchical" and prefill.step_tokens == 64 and prefill.profile.num_tokens == 4 * 64


@pytest.mark.slow
def test_phase_reaches_the_simulator(tmp_path: Path, mlflow_uri: str) -> None:
    trace = random_trace(320, 3, 8, 2, seed=4)
    placement = solve_placement(PlacementProblem(trace, topology(2, 2)), "greedy", {})
    out = tmp_path / "sim"
    proc = run_simulate(f"placement={save_placement(placement, tmp_path / 'g.json')}",
                        f"trace={save_trace(trace, tmp_path / 't.safetensors')}", "topology=cpu_2x2", f"out={out}",
                        "phase=decode", "phase.tokens_per_rank=2", "phase.num_steps=7")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_steps"] == 7 and len(metrics["step_times_s"]) == 7
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("moetuner").experiment_id])
    assert run.data.tags["phase"] == "decode" and run.data.tags["dataflow"] == "low_latency"
