"""moetuner-profile as a user runs it: a subprocess that logs params, metrics and artifacts to MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from moetuner.profiling.stats import load_profile
from moetuner.synth import SynthSpec, synthesize
from moetuner.trace import save_trace

APP = str(Path(sys.executable).with_name("moetuner-profile"))
OUTPUTS = {"profile.npz", "summary.json", "load_heatmap.png", "affinity_heatmap.png", "coactivation_heatmap.png"}


@pytest.mark.slow
def test_profile_multirun_logs_each_job_to_mlflow(tmp_path: Path, mlflow_uri: str) -> None:
    trace = synthesize(SynthSpec(num_tokens=600, num_layers=3, num_experts=16, top_k=2, group_size=4, skew=1.0))
    src = save_trace(trace, tmp_path / "t.safetensors")
    out = tmp_path / "prof"
    done = subprocess.run([APP, "-m", f"trace={src}", f"out={out}/s${{step_tokens}}", "step_tokens=100,300",
                           "mlflow.experiment=profile-test", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          cwd=tmp_path, env=os.environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["profile-test"]).set_index("params.step_tokens")
    assert sorted(runs.index) == ["100", "300"] and set(runs["status"]) == {"FINISHED"}
    for step in (100, 300):
        folder = out / f"s{step}"
        row = runs.loc[str(step)]
        assert OUTPUTS <= {p.name for p in folder.iterdir()}
        assert (folder / "load_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        summary = json.loads((folder / "summary.json").read_text())
        for name in ("mean_imbalance", "max_imbalance", "mean_entropy", "mean_affinity", "mean_step_imbalance"):
            assert row[f"metrics.{name}"] == pytest.approx(summary["metrics"][name])
        assert row["metrics.num_steps"] == 600 // step and row["params.trace"] == str(src)
        assert row["tags.app"] == "profile" and row["tags.model"] == "synthetic"
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(row["run_id"])}
        assert OUTPUTS | {"config.yaml"} <= artifacts
        np.testing.assert_array_equal(load_profile(folder / "profile.npz").load.sum(axis=1), [1200] * 3)
