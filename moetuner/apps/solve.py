"""moetuner-solve: place a trace's experts on a topology with one solver; write the placement + exports.

    moetuner-solve trace=PATH topology=h200_2x8 solver=eplb replicas=1 out=results/eplb.json
    moetuner-solve 'trace=[a.safetensors,b.safetensors]' 'trace_weights=[0.5,0.5]' robust=worst ...

`trace` is one profile trace or a list of them (domains); `trace_weights` (default: equal) weight the
domains, `robust` combines them (mean | worst); `dispatch` and `dataflow` are the engine's, which the
solvers optimise for. `trace` may instead be one load profile (moetuner-import format=<engine dump>),
which the load-only solvers place from. Engine files (SGLang, vLLM, TensorRT-LLM) are written beside
`out` where the model's decoder layers are known: from the trace, or from `model_config` (a config.json).
`phase=prefill|decode` fixes step_tokens and dataflow and solves on the phase's steps (moetuner/phase.py).
`deployment=v2_lite|v3` (conf/deployment/) solves one placement per phase, each on its own unit (topology and
slots per GPU), and writes out/<phase>.json with its engine files (`out` a folder).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.engines import write_placement
from moetuner.deployment import Deployment, DeploymentError, deployment_from_config
from moetuner.load_profile import LOAD_FORMAT, LoadProfile, file_format, load_load_profile
from moetuner.model_layout import ModelLayout, check_record, read_model_config
from moetuner.phase import Phase, phase_from_config, phase_trace, step_settings
from moetuner.placement import Placement
from moetuner.solvers.problem import PlacementProblem, ProblemError
from moetuner.solvers.registry import check_solver_inputs, placement_metrics, solve_placement
from moetuner.topology import Topology, topology_from_config
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


def load_sources(paths: list[str]) -> list[Trace] | LoadProfile:
    """The profile traces at `paths`, or the one load profile among them (alone)."""
    loads = [p for p in paths if file_format(p) == LOAD_FORMAT]
    if loads:
        if len(paths) != 1:
            raise ProblemError(f"{loads[0]} is a load profile; solve from one load profile alone, not with "
                               f"other profiles ({len(paths)} given)")
        return load_load_profile(loads[0])
    return [load_trace(path) for path in paths]


def source_shape(sources: list[Trace] | LoadProfile) -> Trace:
    """A trace with the sources' model shape (experts, top-k, layers, record)."""
    return sources.shape_trace() if isinstance(sources, LoadProfile) else sources[0]


def build_problem(sources: list[Trace] | LoadProfile, topology: Topology, phase: Phase | None, replicas: int,
                  cfg: DictConfig) -> PlacementProblem:
    """The placement problem of `sources` on `topology`; with a `phase`, the phase fixes step_tokens and
    dataflow and each trace becomes its step trace (moetuner/phase.py); the other engine settings from `cfg`."""
    step_tokens, dataflow = step_settings(phase, topology, int(cfg.step_tokens), str(cfg.dataflow))
    engine = dict(replicas=replicas, step_tokens=step_tokens, dispatch=str(cfg.dispatch), dataflow=dataflow,
                  robust=str(cfg.robust))
    if isinstance(sources, LoadProfile):
        return PlacementProblem.from_load_profile(sources, topology, **engine)
    traces = sources if phase is None else [phase_trace(trace, phase, topology) for trace in sources]
    weights = cfg.get("trace_weights")
    return PlacementProblem.from_traces(traces, topology, weights=None if weights is None else list(weights), **engine)


def problem_from_config(cfg: DictConfig) -> PlacementProblem:
    """The placement problem of a solve config: traces (one or several domains), topology, engine, phase."""
    return build_problem(load_sources(trace_paths(cfg.trace)), topology_from_config(cfg.topology),
                         phase_from_config(cfg.get("phase")), int(cfg.replicas), cfg)


def deployment_problems(cfg: DictConfig) -> tuple[Deployment, dict[str, PlacementProblem]]:
    """The deployment of a solve config and one placement problem per unit (phase), each on its own
    topology with its slots; the traces are checked against the deployment's model shape first."""
    if cfg.get("phase") is not None:
        raise DeploymentError("deployment= fixes each unit's phase; drop phase= (or solve one phase without "
                              "deployment=)")
    if Path(str(cfg.out)).suffix:
        raise DeploymentError(f"out={cfg.out}: a deployment writes one placement per phase into a folder "
                              f"(out/prefill.json, out/decode.json); give a folder, e.g. out=p/{cfg.deployment.name}")
    deployment = deployment_from_config(cfg.deployment)
    sources = load_sources(trace_paths(cfg.trace))
    deployment.check_trace(source_shape(sources))
    return deployment, {name: build_problem(sources, unit.topology, unit.phase, unit.replicas(deployment.num_experts),
                                            cfg) for name, unit in deployment.units.items()}


def config_layout(model_config: str | None, trace: Trace) -> ModelLayout | None:
    """The layout of `model_config` (None: none given), checked against what the trace records."""
    if model_config is None:
        return None
    config = read_model_config(model_config)
    check_record(config, {**trace.extra, "moe_layers": trace.moe_layers, "num_experts": trace.num_experts},
                 f"trace {trace.source}")
    return config


def recorded(placement: Placement, problem: PlacementProblem, deployment: Deployment | None = None) -> Placement:
    """`placement` with the phase its steps were built for, if any (and the deployment, marked synthetic or not)."""
    extra = {"phase": problem.profile.extra["phase"]} if "phase" in problem.profile.extra else {}
    if deployment is not None:
        extra.update(deployment=deployment.name, synthetic=deployment.synthetic)
    return replace(placement, extra={**placement.extra, **extra})


def solve_units(problems: dict[str, PlacementProblem], deployment: Deployment | None, cfg: DictConfig,
                layout: ModelLayout | None) -> AppResult:
    """Solve each problem with cfg.solver and write it (with its engine files): at `out` for one problem
    without a deployment, else at out/<phase>.json; metrics per phase prefixed `<phase>.` in a deployment."""
    metrics: dict[str, Any] = {}
    paths: list[Path] = []
    status = {}
    for name, problem in problems.items():
        placement = recorded(solve_placement(problem, cfg.solver.name, OmegaConf.to_container(cfg.solver, resolve=True)),
                             problem, deployment)
        out = Path(str(cfg.out)) / f"{name}.json" if deployment is not None else cfg.out
        paths += write_placement(placement, problem.num_experts, out, layout)
        prefix = f"{name}." if deployment is not None else ""
        metrics.update({prefix + key: value for key, value in placement_metrics(placement, problem.load).items()})
        status[f"{prefix}status"] = placement.status
    return AppResult(metrics, paths, tags=status, headline=None if deployment is not None else "max_gpu_load")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="solve")
@tracked_app("solve")
def main(cfg: DictConfig) -> AppRun:
    # bad inputs fail here, before a run is opened: experts that do not fit, an unknown solver, traces of
    # different models (or not of the deployment's model), bad weights, an unknown dispatch / dataflow / robust
    # mode / phase
    deployment = None
    if cfg.get("deployment") is not None:
        deployment, problems = deployment_problems(cfg)
    else:
        problem = problem_from_config(cfg)
        problems = {problem.profile.extra.get("phase", "placement"): problem}
    first = next(iter(problems.values()))
    for problem in problems.values():
        check_solver_inputs(problem, cfg.solver.name)
    layout = config_layout(cfg.get("model_config"), first.profile)
    tags = {"model": first.profile.model, "dataset": first.profile.source, "solver": cfg.solver.name,
            "topology": ",".join(p.topology.name for p in problems.values()), "dispatch": first.dispatch,
            "dataflow": ",".join(p.dataflow for p in problems.values()),
            "phase": ",".join(p.profile.extra.get("phase", "none") for p in problems.values())}
    if deployment is not None:
        tags.update(deployment=deployment.name, synthetic=str(deployment.synthetic).lower())
    return AppRun(tags, lambda: solve_units(problems, deployment, cfg, layout))
