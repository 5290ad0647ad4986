"""moetuner-solve: place a trace's experts on a topology with one solver; write the placement + exports.

    moetuner-solve trace=PATH topology=h200_2x8 solver=eplb replicas=1 out=results/eplb.json
    moetuner-solve 'trace=[a.safetensors,b.safetensors]' 'trace_weights=[0.5,0.5]' robust=worst ...

`trace` is one profile trace or a list of them (domains); `trace_weights` (default: equal) weight the
domains, `robust` combines them (mean | worst); `dispatch` and `dataflow` are the engine's, which the
solvers optimise for.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.placement.layout import (Placement, engine_settings, export_sglang, export_torch, export_vllm,
                                       gpu_loads, save_placement)
from moetuner.placement.mip import relative_gap
from moetuner.placement.problem import PlacementProblem, ProblemError, get_solver
from moetuner.profiling.stats import imbalance
from moetuner.topology import topology_from_config
from moetuner.trace import Trace, load_trace
from moetuner.tracking import tracked_run

log = logging.getLogger(__name__)


def solve_placement(problem: PlacementProblem, solver: str, options: Mapping[str, Any]) -> Placement:
    """Run solver `solver` on `problem`; record the model, topology and replicas in the placement."""
    placement = get_solver(solver)(problem, options)
    placement.extra.update(num_experts=problem.num_experts, replicas=problem.replicas,
                           topology=problem.topology.name, model=problem.profile.model,
                           source=problem.profile.source, dispatch=problem.dispatch, dataflow=problem.dataflow)
    if len(problem.domains) > 1:
        placement.extra.update(domains=[d.source for d in problem.domains], domain_weights=list(problem.weights),
                               robust=problem.robust)
    return placement


def trace_paths(trace: Any) -> list[str]:
    """`trace` config value (one path or a list of paths) as a list of paths."""
    if isinstance(trace, (str, Path)):
        return [str(trace)]
    paths = list(trace)
    if not paths or not all(isinstance(p, (str, Path)) for p in paths):
        raise ProblemError(f"trace={trace!r}: give one path (trace=PATH) or a non-empty list of paths "
                         f"('trace=[a.safetensors,b.safetensors]')")
    return [str(p) for p in paths]


def problem_from_config(cfg: DictConfig) -> PlacementProblem:
    """The placement problem of a solve config: traces (one or several domains), topology, engine."""
    traces: list[Trace] = [load_trace(path) for path in trace_paths(cfg.trace)]
    weights = cfg.get("trace_weights")
    return PlacementProblem.from_traces(
        traces, topology_from_config(cfg.topology), weights=None if weights is None else list(weights),
        replicas=int(cfg.replicas), step_tokens=int(cfg.step_tokens), dispatch=str(cfg.dispatch),
        dataflow=str(cfg.dataflow), robust=str(cfg.robust))


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
        "imbalance": float(imbalance(per_gpu).mean()),
    }


def write_placement(placement: Placement, num_experts: int, out: str | Path) -> list[Path]:
    """Engine files, then the placement JSON at `out` with an `engines` block of flags (all atomic).

    <stem>.sglang.json: SGLang's --init-expert-location file; <stem>.vllm.json and <stem>.pt: vLLM's
    EPLB maps. `out` is written last, so a complete `out` means the engine files are there too.
    Returns [out, <stem>.vllm.json, <stem>.pt, <stem>.sglang.json].
    """
    out = Path(out)
    sglang = export_sglang(placement, num_experts, out.with_suffix(".sglang.json"))
    vllm = [export_vllm(placement, num_experts, out.with_suffix(".vllm.json")),
            export_torch(placement, num_experts, out.with_suffix(".pt"))]
    engines = engine_settings(placement, num_experts, sglang, tuple(str(p) for p in vllm))
    for name in ("sglang", "vllm"):
        log.info("%s: %s", name, shlex.join(engines[name]["flags"]))
        for note in engines[name]["notes"]:
            log.info("%s: %s", name, note)
    recorded = dataclasses.replace(placement, extra={**placement.extra, "engines": engines})
    return [save_placement(recorded, out), *vllm, sglang]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="solve")
def main(cfg: DictConfig) -> None:
    # bad inputs fail here, before a run is opened: experts that do not fit, an unknown solver,
    # traces of different models, bad weights, an unknown dispatch / dataflow / robust mode
    problem = problem_from_config(cfg)
    trace = problem.profile
    get_solver(cfg.solver.name)
    tags = {"model": trace.model, "dataset": trace.source, "solver": cfg.solver.name,
            "topology": problem.topology.name, "dispatch": problem.dispatch, "dataflow": problem.dataflow}
    with tracked_run("solve", cfg, tags=tags) as run:
        placement = solve_placement(problem, cfg.solver.name, OmegaConf.to_container(cfg.solver, resolve=True))
        paths = write_placement(placement, trace.num_experts, cfg.out)
        run.log_metrics(placement_metrics(placement, problem.load))
        run.set_tags({"status": placement.status})
        for path in paths:
            run.log_artifact(path)
