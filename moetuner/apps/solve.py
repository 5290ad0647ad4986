"""moetuner-solve: place a trace's experts on a topology with one solver; write the placement + exports.

    moetuner-solve trace=PATH topology=h200_2x8 solver=eplb replicas=1 out=results/eplb.json
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.placement.layout import Placement, export_torch, export_vllm, gpu_loads, save_placement
from moetuner.placement.mip import relative_gap
from moetuner.placement.problem import PlacementProblem, get_solver
from moetuner.topology import topology_from_config
from moetuner.trace import load_trace
from moetuner.tracking import tracked_run


def solve_placement(problem: PlacementProblem, solver: str, options: Mapping[str, Any]) -> Placement:
    """Run solver `solver` on `problem`; record the model, topology and replicas in the placement."""
    placement = get_solver(solver)(problem, options)
    placement.extra.update(num_experts=problem.num_experts, replicas=problem.replicas,
                           topology=problem.topology.name, model=problem.profile.model,
                           source=problem.profile.source)
    return placement


def placement_metrics(placement: Placement, load: np.ndarray) -> dict[str, float | None]:
    """Solve record plus profile tokens per GPU: max/mean/imbalance, each averaged over layers."""
    per_gpu = gpu_loads(placement.phy2log, load, placement.num_gpus)  # [L, G]
    mean = per_gpu.mean(1)
    return {
        "objective": placement.objective,
        "bound": placement.bound,
        "gap": relative_gap(placement.objective, placement.bound),
        "solve_seconds": placement.solve_seconds,
        "max_gpu_load": float(per_gpu.max(1).mean()),
        "mean_gpu_load": float(mean.mean()),
        "imbalance": float((per_gpu.max(1) / np.maximum(mean, 1e-12)).mean()),
    }


def write_placement(placement: Placement, num_experts: int, out: str | Path) -> list[Path]:
    """Placement JSON at `out`, vLLM maps at <stem>.vllm.json, torch maps at <stem>.pt (all atomic)."""
    out = Path(out)
    return [save_placement(placement, out),
            export_vllm(placement, num_experts, out.with_suffix(".vllm.json")),
            export_torch(placement, num_experts, out.with_suffix(".pt"))]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="solve")
def main(cfg: DictConfig) -> None:
    trace = load_trace(cfg.trace)
    # bad inputs fail here, before a run is opened: experts that do not fit, an unknown solver
    problem = PlacementProblem(trace, topology_from_config(cfg.topology), replicas=int(cfg.replicas),
                               step_tokens=int(cfg.step_tokens))
    get_solver(cfg.solver.name)
    tags = {"model": trace.model, "dataset": trace.source, "solver": cfg.solver.name,
            "topology": problem.topology.name}
    with tracked_run("solve", cfg, tags=tags) as run:
        placement = solve_placement(problem, cfg.solver.name, OmegaConf.to_container(cfg.solver, resolve=True))
        paths = write_placement(placement, trace.num_experts, cfg.out)
        run.log_metrics(placement_metrics(placement, problem.load))
        run.set_tags({"status": placement.status})
        for path in paths:
            run.log_artifact(path)
