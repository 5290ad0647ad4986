"""moetuner-simulate: the pure part in-process, the Hydra app (single run, -m sweep, bad input) by subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moetuner.apps.simulate import write_outputs
from moetuner.costmodel.evaluate import run_simulation
from moetuner.solvers.registry import solve_placement
from moetuner.placement import PlacementError, save_placement
from moetuner.solvers.problem import PlacementProblem
from moetuner.costmodel.cost import SimulationError
from moetuner.costmodel.settings import DISPATCHES
from moetuner.trace import save_trace, split_by_sequence
from test_solvers import random_trace, topology

APP = [sys.executable, "-c", "from moetuner.apps.simulate import main; main()"]


def run_app(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([*APP, *overrides], capture_output=True, text=True, timeout=300, env=os.environ.copy())


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """(held-out trace, greedy placement solved on the profile part for cpu_2x2)."""
    profile, heldout = split_by_sequence(random_trace(320, 3, 8, 2, seed=4), 0.5, seed=0)
    problem = PlacementProblem(profile, topology(2, 2), replicas=1)
    placement = solve_placement(problem, "greedy", {})
    return save_trace(heldout, tmp_path / "heldout.safetensors"), save_placement(placement, tmp_path / "greedy.json")


def test_contiguous_scores_speedup_one(tmp_path: Path) -> None:
    trace = random_trace(128, 2, 8, 2)
    placement = solve_placement(PlacementProblem(trace, topology(2, 2)), "contiguous", {})
    result, base, metrics = run_simulation(placement, trace, topology(2, 2), 32, "dispatch_combine", "dynamic")
    assert metrics["speedup_vs_contiguous"] == 1.0 and metrics["num_steps"] == 4
    paths = write_outputs(result, base, metrics, trace.moe_layers, tmp_path / "sim")
    assert [p.name for p in paths] == ["metrics.json", "per_layer.csv", "gpu_load_boxplot.png",
                                       "a2a_tail_per_layer.png"]
    rows = list(csv.DictReader(paths[1].open()))
    assert len(rows) == 2 and float(rows[0]["layer_time_s"]) == pytest.approx(result.layer_time_s.mean(0)[0], rel=1e-5)


def test_mismatches_are_refused() -> None:
    trace = random_trace(64, 2, 8, 2)
    placement = solve_placement(PlacementProblem(trace, topology(2, 2)), "greedy", {})
    with pytest.raises(PlacementError, match="placement is for 2 node.* x 4 GPUs but topology test_1x2 has 1 node"):
        run_simulation(placement, trace, topology(1, 2), 32, "dispatch_combine")
    with pytest.raises(PlacementError, match="solved for 8 experts but the model has 16"):
        run_simulation(placement, random_trace(64, 2, 16, 2), topology(2, 2), 32, "dispatch_combine")
    with pytest.raises(SimulationError, match="dispatch='balanced' is unknown"):
        run_simulation(placement, trace, topology(2, 2), 32, "dispatch_combine", "balanced")


def test_every_dispatch_in_one_run() -> None:
    trace = random_trace(256, 2, 8, 2, seed=1)
    problem = PlacementProblem(trace, topology(2, 2), replicas=1)
    placement = solve_placement(problem, "greedy", {})
    placement.extra["dispatch"] = "static"  # as if solved for SGLang's static dispatch
    result, _, metrics = run_simulation(placement, trace, topology(2, 2), 64, "dispatch_combine",
                                        dispatches=DISPATCHES)
    assert metrics["dispatch"] == "static" and list(metrics["by_dispatch"]) == ["static", "dynamic", "lp", "lp_comm"]
    assert metrics["layer_time_s"] == metrics["by_dispatch"]["static"]["layer_time_s"]
    assert metrics["layer_time_s"] == pytest.approx(result.metrics()["layer_time_s"])
    for name in DISPATCHES:  # each scored on its own split, against one contiguous baseline
        alone = run_simulation(placement, trace, topology(2, 2), 64, "dispatch_combine", name)[2]
        assert metrics["by_dispatch"][name]["layer_time_s"] == alone["layer_time_s"]
        assert metrics["by_dispatch"][name]["contiguous_layer_time_s"] == metrics["contiguous_layer_time_s"]
    busiest = {name: m["compute_tail_ratio"] for name, m in metrics["by_dispatch"].items()}
    assert busiest["lp"] <= busiest["dynamic"] + 1e-12  # lp balances pairs per GPU at least as well


@pytest.mark.slow
def test_app_single_run_and_sweep(tmp_path: Path, files: tuple[Path, Path], mlflow_uri: str) -> None:
    trace, placement = files
    out = tmp_path / "sim" / "greedy"
    proc = run_app(f"placement={placement}", f"trace={trace}", "topology=cpu_2x2", f"out={out}", "step_tokens=32",
                   "dispatches=[dynamic,static,lp,lp_comm]")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dispatch"] == "dynamic" and sorted(metrics["by_dispatch"]) == sorted(DISPATCHES)
    assert metrics["layer_time_s"] > 0 and metrics["speedup_vs_contiguous"] > 0
    assert metrics["layer_time_s"] >= metrics["a2a_time_s"] and (out / "gpu_load_boxplot.png").stat().st_size > 0
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("moetuner").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["solver"] == "greedy"
    assert run.data.metrics["layer_time_s"] == pytest.approx(metrics["layer_time_s"])
    assert run.data.metrics["lp_comm.layer_time_s"] == pytest.approx(metrics["by_dispatch"]["lp_comm"]["layer_time_s"])

    proc = run_app("-m", f"placement={placement}", f"trace={trace}", "topology=cpu_2x2", "step_tokens=32",
                   "dataflow=dispatch_combine,expert_to_expert", f"out={tmp_path}/sweep/" + "${dataflow}",
                   f"hydra.sweep.dir={tmp_path}/multirun")
    assert proc.returncode == 0, proc.stderr
    for dataflow in ("dispatch_combine", "expert_to_expert"):
        assert json.loads((tmp_path / "sweep" / dataflow / "metrics.json").read_text())["num_steps"] >= 1


def test_bound_and_gap_to_bound() -> None:
    """bound=True adds the fixed-placement bound on the scored steps; every dispatch's charged time is above it."""
    trace = random_trace(256, 2, 8, 2, seed=2)
    placement = solve_placement(PlacementProblem(trace, topology(2, 2), replicas=1), "eplb", {})
    _, _, metrics = run_simulation(placement, trace, topology(2, 2), 64, "dispatch_combine", "dynamic",
                                   dispatches=DISPATCHES, bound=True)
    assert metrics["bound_step_s"] > 0
    for scalars in metrics["by_dispatch"].values():
        assert scalars["gap_to_bound"] == pytest.approx(scalars["layer_time_s"] / metrics["bound_step_s"])
        assert scalars["gap_to_bound"] >= 1.0
    assert "gap_to_bound" not in run_simulation(placement, trace, topology(2, 2), 64, "dispatch_combine")[2]


@pytest.mark.slow
def test_app_refuses_wrong_topology(tmp_path: Path, files: tuple[Path, Path], mlflow_uri: str) -> None:
    trace, placement = files
    proc = run_app(f"placement={placement}", f"trace={trace}", "topology=h100_1x8", f"out={tmp_path / 'x'}")
    assert proc.returncode != 0 and "placement is for 2 node(s) x 4 GPUs but topology h100_1x8 has 1 node(s) x 8" \
        in proc.stderr
    assert not (tmp_path / "x" / "metrics.json").exists()
