"""Checks of a study config (`conf/study/*.yaml`) that the Snakefile runs at parse time.

A mistake in the grid (an unknown trace, topology or solver, a shipped trace file that is missing)
fails before any job starts, with a message naming the setting to change.

Why not Snakemake's `validate()` with a JSON schema for the structural part (kinds, required keys,
replicas >= 0): its message is jsonschema's, e.g. for `replicas: [-1]` "-1 is less than the minimum of
0 / Failed validating 'minimum' in schema['properties']['grids']['items']['properties']['replicas']
['items'] / On instance['grids'][0]['replicas'][0]", where this module says
"grids[0].replicas: [-1]; replicas are integers >= 0" (and "a grid needs [...]", "choose one of [...]"
elsewhere): the path is the schema's, not the setting's, and the fix is not said. It would also raise
Snakemake's WorkflowError only inside a workflow, so callers outside one (the tests, the apps) would lose
the checks. With one home per check the whole set stays here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moetuner.study.targets import SPLIT_VARIANT, main_split_seed

# trace kind -> the keys its spec must have (besides `kind`); `args` is optional for every kind
TRACE_KINDS: dict[str, tuple[str, ...]] = {
    "extract": ("preset",),  # a tiny preset model on text
    "file": ("path",),  # a trace file in the repository (path relative to the project root)
    "import": ("real",),  # real routing under shared_data (skipped and reported when absent)
    "synth": (),
    "loads": ("of",),  # the load profile of trace `of` (per-step expert loads, as an engine dumps them)
}
GRID_KEYS = ("traces", "topologies", "solvers", "replicas", "evaluate_on")  # and optionally split_seeds
PHASE_KEYS = ("deployment", "traces", "solvers", "evaluate_on")  # and optionally solver_args, simulate, bound


class StudyConfigError(ValueError):
    """The study config cannot work; the message names the setting and the fix."""


def _conf_names(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _check_names(setting: str, names: list[str], known: list[str], what: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StudyConfigError(f"{setting}: unknown {what} {unknown}; choose from {known}")


def _check_token_traces(setting: str, names: list[str], traces: Mapping[str, Any]) -> None:
    loads = [n for n in names if traces[n]["kind"] == "loads"]
    if loads:
        raise StudyConfigError(f"{setting}: {loads} are load profiles, which have no token-level routing to "
                               f"serve or profile; name routing traces here")


def check_load_only(setting: str, names: list[str], solvers: list[str], traces: Mapping[str, Any]) -> None:
    """A grid over a `loads` trace may only use solvers that need loads alone (LOAD_ONLY_SOLVERS)."""
    from moetuner.solvers.registry import LOAD_ONLY_SOLVERS

    bad = [s for s in solvers if s not in LOAD_ONLY_SOLVERS]
    if bad and any(traces[n]["kind"] == "loads" for n in names):
        raise StudyConfigError(f"{setting}: solvers {bad} need token-level routing and the grid has a loads trace; "
                               f"put loads traces in a grid of {list(LOAD_ONLY_SOLVERS)}")


def check_split_seeds(setting: str, grid: Mapping[str, Any], traces: Mapping[str, Any], main_seed: int) -> None:
    """A grid's `split_seeds`: distinct integers >= 0, the main split's seed among them, over routing traces;
    its `split_evaluate_on` (optional) some of its `evaluate_on`."""
    seeds = list(grid["split_seeds"])
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise StudyConfigError(f"{setting}.split_seeds: {seeds}; give distinct integers >= 0 (e.g. [0, 1, 2, 3, 4])")
    if main_seed not in seeds:
        raise StudyConfigError(f"{setting}.split_seeds: {seeds} lacks the main split's seed {main_seed} (`split:`); "
                               f"add it, so the grid's other stages and its re-splits share that split")
    _check_token_traces(f"{setting}.traces", list(grid["traces"]), traces)
    extra = [e for e in grid.get("split_evaluate_on", []) if e not in grid["evaluate_on"]]
    if extra:
        raise StudyConfigError(f"{setting}.split_evaluate_on: {extra} not in the grid's evaluate_on "
                               f"{list(grid['evaluate_on'])}; re-splits are scored on some of the grid's evaluations")


def check_traces(traces: Mapping[str, Any], project: Path) -> None:
    """Every trace spec has a known kind and its keys; every `file` trace exists under `project`; no name is
    a re-split's (`<trace>.split<seed>`, moetuner.study.targets.SPLIT_VARIANT)."""
    if not traces:
        raise StudyConfigError("traces: empty; a study needs at least one trace")
    for name, spec in traces.items():
        if SPLIT_VARIANT.fullmatch(name):
            raise StudyConfigError(f"traces.{name}: names ending in .split<digits> are the study's re-splits "
                                   f"(a grid's split_seeds); rename the trace")
        kind = spec.get("kind")
        if kind not in TRACE_KINDS:
            raise StudyConfigError(f"traces.{name}.kind={kind!r}; choose one of {sorted(TRACE_KINDS)}")
        missing = [k for k in TRACE_KINDS[kind] if k not in spec]
        if missing:
            raise StudyConfigError(f"traces.{name}: kind {kind} needs {missing}")
        if kind == "loads" and traces.get(spec["of"], {}).get("kind") in (None, "loads"):
            raise StudyConfigError(f"traces.{name}.of={spec['of']!r}: name a routing trace of this config (not "
                                   f"a loads trace); its profile split's loads are what the load-only solvers see")
        if kind == "file" and not (project / spec["path"]).is_file():
            raise StudyConfigError(f"traces.{name}.path={spec['path']}: no such file under {project}; "
                                   f"the path is relative to the project root (see data/README.md)")


def check_phases(phases: Mapping[str, Any], traces: Mapping[str, Any], conf: Path) -> None:
    """The `phases` section: a known deployment (both checked as `moetuner-solve deployment=` would), routing
    traces of this config, known solvers, evaluations of this config; `solver_args` only for its solvers."""
    from moetuner.deployment import DeploymentError, deployment_from_config, deployment_preset

    missing = [k for k in PHASE_KEYS if k not in phases]
    if missing:
        raise StudyConfigError(f"phases: missing {missing}; the section needs {list(PHASE_KEYS)}")
    _check_names("phases.deployment", [phases["deployment"]], _conf_names(conf, "deployment"), "deployment")
    try:
        deployment_from_config(deployment_preset(str(phases["deployment"])))
    except DeploymentError as err:
        raise StudyConfigError(f"phases.deployment={phases['deployment']}: {err}") from err
    _check_names("phases.traces", list(phases["traces"]), list(traces), "trace(s)")
    _check_token_traces("phases.traces", list(phases["traces"]), traces)
    _check_names("phases.solvers", list(phases["solvers"]), _conf_names(conf, "solver"), "solver(s)")
    _check_names("phases.evaluate_on", list(phases["evaluate_on"]), ["heldout", *traces], "evaluation(s)")
    _check_names("phases.solver_args", list(phases.get("solver_args") or {}), list(phases["solvers"]),
                  "solver(s) (not in phases.solvers)")


def check_study_config(config: Mapping[str, Any], project: Path) -> None:
    """Raise StudyConfigError unless traces, grids, phases and serve refer to things that exist.

    project: the project root (holds conf/{topology,solver,policy}/*.yaml and `file` traces).
    """
    traces = config.get("traces") or {}
    check_traces(traces, project)
    conf = project / "conf"
    topologies, solvers = _conf_names(conf, "topology"), _conf_names(conf, "solver")
    for i, grid in enumerate(config.get("grids") or []):
        missing = [k for k in GRID_KEYS if k not in grid]
        if missing:
            raise StudyConfigError(f"grids[{i}]: missing {missing}; a grid needs {list(GRID_KEYS)}")
        _check_names(f"grids[{i}].traces", list(grid["traces"]), list(traces), "trace(s)")
        _check_names(f"grids[{i}].evaluate_on", list(grid["evaluate_on"]), ["heldout", *traces], "evaluation(s)")
        _check_names(f"grids[{i}].topologies", list(grid["topologies"]), topologies, "topology")
        _check_names(f"grids[{i}].solvers", list(grid["solvers"]), solvers, "solver(s)")
        check_load_only(f"grids[{i}]", grid["traces"], grid["solvers"], traces)
        bad = [r for r in grid["replicas"] if not isinstance(r, int) or r < 0]
        if bad:
            raise StudyConfigError(f"grids[{i}].replicas: {bad}; replicas are integers >= 0")
        if "split_seeds" in grid:
            check_split_seeds(f"grids[{i}]", grid, traces, main_split_seed(config))
    if not isinstance(config.get("bound", False), bool):
        raise StudyConfigError(f"bound: {config['bound']!r}; give true (each grid setting's fixed-placement bound, "
                               f"once) or false")
    regime = config.get("regime")
    if regime:
        _check_names("regime.traces", list(regime["traces"]), list(traces), "trace(s)")
        _check_token_traces("regime.traces", regime["traces"], traces)
        _check_names("regime.topologies", list(regime["topologies"]), topologies, "topology")
    online = config.get("online")
    if online:
        _check_names("online.policies", list(online.get("policies") or []), _conf_names(conf, "policy"), "policy")
    if config.get("phases"):
        check_phases(config["phases"], traces, conf)
    serve = config.get("serve")
    if serve:
        _check_names("serve.traces", list(serve["traces"]), list(traces), "trace(s)")
        _check_token_traces("serve.traces", serve["traces"], traces)
        _check_names("serve.topology", [serve["topology"]], topologies, "topology")
        _check_names("serve.solvers", list(serve["solvers"]), solvers, "solver(s)")
