"""moetuner-solve: place a trace's experts on a topology with one solver; write the placement + exports.

    moetuner-solve trace=PATH topology=h200_2x8 solver=eplb replicas=1 out=results/eplb.json
    moetuner-solve 'trace=[a.safetensors,b.safetensors]' 'trace_weights=[0.5,0.5]' robust=worst ...

`trace` is one profile trace or a list of them (domains); `trace_weights` (default: equal) weight the
domains, `robust` combines them (mean | worst); `dispatch` and `dataflow` are the engine's, which the
solvers optimise for. `trace` may instead be one load profile (moetuner-import format=<engine dump>),
which the load-only solvers place from. Engine files (SGLang, vLLM, TensorRT-LLM) are written beside
`out` where the model's decoder layers are known: from the trace, or from `model_config` (a config.json).
`phase=prefill|decode` fixes step_tokens and dataflow and solves on the phase's steps (moetuner/phase.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.engines import write_placement
from moetuner.load_profile import LOAD_FORMAT, file_format, load_load_profile
from moetuner.model_layout import ModelLayout, check_record, read_model_config
from moetuner.phase import phase_from_config, phase_trace, step_settings
from moetuner.solvers.problem import PlacementProblem, ProblemError
from moetuner.solvers.registry import check_solver_inputs, placement_metrics, solve_placement
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
    """The placement problem of a solve config: traces (one or several domains), topology, engine. With a
    `phase`, the phase fixes step_tokens and dataflow and each trace becomes its step trace (moetuner/phase.py)."""
    paths = trace_paths(cfg.trace)
    topology = topology_from_config(cfg.topology)
    phase = phase_from_config(cfg.get("phase"))
    step_tokens, dataflow = step_settings(phase, topology, int(cfg.step_tokens), str(cfg.dataflow))
    engine = dict(replicas=int(cfg.replicas), step_tokens=step_tokens, dispatch=str(cfg.dispatch),
                  dataflow=dataflow, robust=str(cfg.robust))
    loads = [p for p in paths if file_format(p) == LOAD_FORMAT]
    if loads:
        if len(paths) != 1:
            raise ProblemError(f"{loads[0]} is a load profile; solve from one load profile alone, not with "
                               f"other profiles ({len(paths)} given)")
        return PlacementProblem.from_load_profile(load_load_profile(loads[0]), topology, **engine)
    traces: list[Trace] = [load_trace(path) for path in paths]
    if phase is not None:
        traces = [phase_trace(trace, phase, topology) for trace in traces]
    weights = cfg.get("trace_weights")
    return PlacementProblem.from_traces(traces, topology, weights=None if weights is None else list(weights), **engine)


def config_layout(model_config: str | None, trace: Trace) -> ModelLayout | None:
    """The layout of `model_config` (None: none given), checked against what the trace records."""
    if model_config is None:
        return None
    config = read_model_config(model_config)
    check_record(config, {**trace.extra, "moe_layers": trace.moe_layers, "num_experts": trace.num_experts},
                 f"trace {trace.source}")
    return config


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="solve")
@tracked_app("solve")
def main(cfg: DictConfig) -> AppRun:
    # bad inputs fail here, before a run is opened: experts that do not fit, an unknown solver,
    # traces of different models, bad weights, an unknown dispatch / dataflow / robust mode
    problem = problem_from_config(cfg)
    trace = problem.profile
    check_solver_inputs(problem, cfg.solver.name)
    layout = config_layout(cfg.get("model_config"), trace)
    tags = {"model": trace.model, "dataset": trace.source, "solver": cfg.solver.name,
            "topology": problem.topology.name, "dispatch": problem.dispatch, "dataflow": problem.dataflow,
            "phase": str(cfg.phase.name) if cfg.get("phase") else "none"}

    def work() -> AppResult:
        placement = solve_placement(problem, cfg.solver.name, OmegaConf.to_container(cfg.solver, resolve=True))
        paths = write_placement(placement, trace.num_experts, cfg.out, layout)
        return AppResult(placement_metrics(placement, problem.load), paths, tags={"status": placement.status},
                         headline="max_gpu_load")

    return AppRun(tags, work)
