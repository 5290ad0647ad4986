"""moetuner-solve: the pure parts in-process, the Hydra app (single run, -m sweep, bad input) by subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moetuner.engines import write_placement
from moetuner.solvers.registry import placement_metrics, solve_placement
from moetuner.placement import load_placement
from moetuner.solvers.problem import PlacementProblem
from moetuner.trace import Trace, save_trace
from test_solvers import make_trace, random_trace, topology

APP = [sys.executable, "-c", "from moetuner.apps.solve import main; main()"]


def run_app(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([*APP, *overrides], capture_output=True, text=True, timeout=300, env=os.environ.copy())


def mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("moetuner")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_metrics_by_hand(tmp_path: Path) -> None:
    ids = np.array([0] * 6 + [1] * 2 + [2, 3])[:, None, None]  # load [6, 2, 1, 1], one layer, top-1
    problem = PlacementProblem(make_trace(ids, 4), topology(1, 2))
    placement = solve_placement(problem, "contiguous", {})
    assert placement.extra["num_experts"] == 4 and placement.extra["topology"] == "test_1x2"
    metrics = placement_metrics(placement, problem.load)  # GPU0 holds 0,1 (8 tokens), GPU1 2,3 (2)
    assert metrics["max_gpu_load"] == 8 and metrics["mean_gpu_load"] == 5 and metrics["imbalance"] == 1.6
    assert metrics["bound"] is None and metrics["gap"] is None


def with_layers(trace: Trace, total: int, moe_layers: list[int]) -> Trace:
    """`trace` of a model with `total` decoder layers whose MoE layers are `moe_layers`."""
    return dataclasses.replace(trace, moe_layers=moe_layers, extra={**trace.extra, "num_hidden_layers": str(total)})


def test_write_placement(tmp_path: Path) -> None:
    trace = with_layers(random_trace(100, 2, 8, 2), 3, [1, 2])  # layer 0 dense
    placement = solve_placement(PlacementProblem(trace, topology(2, 2), replicas=1), "eplb", {})
    assert placement.extra["num_hidden_layers"] == 3 and placement.extra["moe_layers"] == [1, 2]
    paths = write_placement(placement, 8, tmp_path / "eplb.json")
    assert [p.name for p in paths] == ["eplb.json", "eplb.sglang.json", "eplb.vllm.jsonl", "eplb.trtllm.yaml",
                                       "eplb.trtllm-options.yaml"]
    back = load_placement(paths[0]).validate(8)
    assert np.array_equal(back.phy2log, placement.phy2log) and back.extra["replicas"] == 1
    sglang = json.loads(paths[1].read_text())["physical_to_logical_map"]
    assert sglang[0] == [i % 8 for i in range(12)] and sglang[1:] == placement.phy2log.tolist()
    assert back.extra["engines"]["sglang"]["file"] == str(paths[1])


def test_write_placement_without_layout_writes_the_placement_only(tmp_path: Path) -> None:
    placement = solve_placement(PlacementProblem(random_trace(100, 2, 8, 2), topology(2, 2)), "greedy", {})
    assert "num_hidden_layers" not in placement.extra
    assert write_placement(placement, 8, tmp_path / "g.json") == [tmp_path / "g.json"]
    assert "model_config" in load_placement(tmp_path / "g.json").extra["engines"]["missing"]


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return save_trace(with_layers(random_trace(160, 3, 8, 2, seed=2), 3, [0, 1, 2]), tmp_path / "tiny.safetensors")


@pytest.mark.slow
def test_app_single_run(tmp_path: Path, trace_file: Path, mlflow_uri: str) -> None:
    out = tmp_path / "res" / "greedy.json"
    proc = run_app(f"trace={trace_file}", "topology=cpu_2x2", "solver=greedy", "replicas=1", f"out={out}")
    assert proc.returncode == 0, proc.stderr
    placement = load_placement(out).validate(8)
    assert placement.phy2log.shape == (3, 4 * 3) and placement.solver == "greedy"
    assert all(out.with_suffix(suffix).is_file() for suffix in (".sglang.json", ".vllm.jsonl", ".trtllm.yaml"))
    assert (tmp_path / "res" / ".hydra" / "greedy.json" / "config.yaml").is_file()
    [run] = mlflow_runs(mlflow_uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["solver"] == "greedy" and run.data.tags["status"] == "heuristic"
    assert run.data.metrics["objective"] == pytest.approx(placement.objective)
    assert run.data.metrics["max_gpu_load"] >= run.data.metrics["mean_gpu_load"] > 0
    assert run.data.params["replicas"] == "1" and run.data.params["topology.name"] == "cpu_2x2"
    from mlflow.tracking import MlflowClient
    logged = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id)}
    assert {"greedy.json", "greedy.sglang.json", "greedy.vllm.jsonl", "greedy.trtllm.yaml"} <= logged


@pytest.mark.slow
def test_app_sweep_over_two_solvers(tmp_path: Path, trace_file: Path, mlflow_uri: str) -> None:
    proc = run_app("-m", f"trace={trace_file}", "topology=cpu_2x2", "solver=greedy,eplb",
                   f"out={tmp_path}/sweep/" + "${solver.name}.json", f"hydra.sweep.dir={tmp_path}/multirun")
    assert proc.returncode == 0, proc.stderr
    for name in ("greedy", "eplb"):
        assert load_placement(tmp_path / "sweep" / f"{name}.json").validate(8).solver == name
    assert sorted(r.data.tags["solver"] for r in mlflow_runs(mlflow_uri)) == ["eplb", "greedy"]
    assert (tmp_path / "multirun" / "0").is_dir() and (tmp_path / "multirun" / "1").is_dir()


@pytest.mark.slow
def test_app_refuses_experts_that_do_not_fit(tmp_path: Path, trace_file: Path, mlflow_uri: str) -> None:
    out = tmp_path / "never.json"
    proc = run_app(f"trace={trace_file}", "topology=cpu_2x2", "topology.max_slots_per_gpu=1", f"out={out}")
    assert proc.returncode != 0
    assert "cannot hold 8 experts" in proc.stderr
    assert not out.exists() and mlflow_runs(mlflow_uri) == []


def test_problem_from_config_reads_one_or_several_traces(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from moetuner.apps.solve import problem_from_config
    from moetuner.solvers.problem import ProblemError

    a = save_trace(random_trace(96, 2, 8, 2, seed=1), tmp_path / "a.safetensors")
    b = save_trace(random_trace(32, 2, 8, 2, seed=2), tmp_path / "b.safetensors")
    topo = {"name": "test_1x2", "nodes": 1, "gpus_per_node": 2, "intra_node_bw_GBps": 450.0,
            "inter_node_bw_GBps": 50.0, "gpu_peak_tflops": 1.0, "hbm_bw_GBps": 1.0}
    base = {"topology": topo, "replicas": 0, "step_tokens": 16,
            "dispatch": "static", "dataflow": "hierarchical", "robust": "mean", "trace_weights": None}
    one = problem_from_config(OmegaConf.create({**base, "trace": str(a)}))
    assert len(one.domains) == 1 and one.dispatch == "static" and one.dataflow == "hierarchical"
    two = problem_from_config(OmegaConf.create({**base, "trace": [str(a), str(b)], "trace_weights": [3, 1]}))
    assert two.weights == (0.75, 0.25) and two.profile.num_tokens == 128
    assert np.allclose(two.load, one.load + PlacementProblem(random_trace(32, 2, 8, 2, seed=2),
                                                             one.topology).load)  # token shares = concatenation
    placement = solve_placement(two, "greedy", {})
    assert placement.extra["dispatch"] == "static" and placement.extra["domain_weights"] == [0.75, 0.25]
    with pytest.raises(ProblemError, match="non-empty list of paths"):
        problem_from_config(OmegaConf.create({**base, "trace": []}))


@pytest.mark.slow
def test_app_two_domains_worst_case(tmp_path: Path, mlflow_uri: str) -> None:
    a = save_trace(random_trace(128, 2, 8, 2, seed=1), tmp_path / "a.safetensors")
    b = save_trace(random_trace(128, 2, 8, 2, seed=2), tmp_path / "b.safetensors")
    out = tmp_path / "robust.json"
    proc = run_app(f"trace=[{a},{b}]", "trace_weights=[0.5,0.5]", "robust=worst", "dispatch=lp_comm",
                   "topology=cpu_2x2", "solver=steptail", "solver.time_limit_s=1", "step_tokens=64",
                   "replicas=1", f"out={out}")
    assert proc.returncode == 0, proc.stderr
    placement = load_placement(out).validate(8)
    assert placement.extra["robust"] == "worst" and placement.extra["dispatch"] == "lp_comm"
    assert placement.extra["domains"] == ["random", "random"] and placement.extra["search_dispatch"] == "dynamic"
    [run] = mlflow_runs(mlflow_uri)
    assert run.data.tags["dispatch"] == "lp_comm"
