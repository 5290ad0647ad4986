"""Hydra multirun (-m) of moetuner-solve: solvers x replica budgets in one command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moetuner.trace import Trace, save_trace

BIN = Path(sys.executable).parent


def tiny_trace(path: Path, num_experts: int = 6) -> Path:
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.choice(num_experts, 2, replace=False) for _ in range(2)] for _ in range(64)])  # [64, 2, 2]
    trace = Trace(topk_ids=ids.astype(np.int16), seq_ids=np.repeat(np.arange(4), 16).astype(np.int32),
                  model="tiny", num_experts=num_experts, moe_layers=[0, 1], source="test",
                  hidden_size=64, moe_intermediate_size=32)
    return save_trace(trace, path)


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "moetuner-solve").exists(), reason="moetuner-solve is not installed")
def test_solver_by_replica_sweep(tmp_path: Path) -> None:
    trace = tiny_trace(tmp_path / "t.safetensors")
    cmd = [str(BIN / "moetuner-solve"), "-m", f"trace={trace}", "topology=cpu_2x2", "solver=contiguous,greedy",
           "replicas=0,1", "mlflow=off", "out=placements/${solver.name}-r${replicas}.json"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr[-3000:]
    for solver in ("contiguous", "greedy"):
        for replicas in (0, 1):
            doc = json.loads((tmp_path / "placements" / f"{solver}-r{replicas}.json").read_text())
            phy2log = np.asarray(doc["physical_to_logical_map"])
            assert doc["solver"] == solver
            # 4 GPUs on cpu_2x2: ceil(6/4) + replicas slots each
            assert phy2log.shape == (2, 4 * (math.ceil(6 / 4) + replicas))
            assert set(range(6)) <= set(phy2log[0].tolist())
    jobs = sorted(p.name for p in (tmp_path / "multirun" / "solve").glob("*/*") if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
