"""moetuner-solve: place a trace's experts on a topology with one solver; write the placement + exports.

    moetuner-solve trace=PATH topology=h200_2x8 solver=eplb replicas=1 out=results/eplb.json
    moetuner-solve 'trace=[a.safetensors,b.safetensors]' 'trace_weights=[0.5,0.5]' robust=worst ...

`trace` is one profile trace or a list of them (domains); `trace_weights` (default: equal) weight the
domains, `robust` combines them (mean | worst); `dispatch` and `dataflow` are the engine's, which the
solvers optimise for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.engines import write_placement
from moetuner.solvers.problem import PlacementProblem, ProblemError
from moetuner.solvers.registry import get_solver, placement_metrics, solve_placement
from moetuner.topology import topology_from_config
from moetuner.trace import Trace, load_trace
from moetuner.tracking import AppResult, AppRun, tracked_app


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="solve")
@tracked_app("solve")
def main(cfg: DictConfig) -> AppRun:
    # bad inputs fail here, before a run is opened: experts that do not fit, an unknown solver,
    # traces of different models, bad weights, an unknown dispatch / dataflow / robust mode
    problem = problem_from_config(cfg)
    trace = problem.profile
    get_solver(cfg.solver.name)
    tags = {"model": trace.model, "dataset": trace.source, "solver": cfg.solver.name,
            "topology": problem.topology.name, "dispatch": problem.dispatch, "dataflow": problem.dataflow}

    def work() -> AppResult:
        placement = solve_placement(problem, cfg.solver.name, OmegaConf.to_container(cfg.solver, resolve=True))
        paths = write_placement(placement, trace.num_experts, cfg.out)
        return AppResult(placement_metrics(placement, problem.load), paths, tags={"status": placement.status},
                         headline="max_gpu_load")

    return AppRun(tags, work)
