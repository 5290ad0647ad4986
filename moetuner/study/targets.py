"""The study grid (`conf/study/*.yaml`) expanded into the files the Snakemake rules make.

Pure functions of the study config, the names of the traces that are available (an `import` trace
whose real data is absent is skipped) and the results folder; `workflow/rules/common.smk` binds them
to the parsed config. The file layout under `results` is defined here once (LAYOUT): the rules name their
outputs with the same path functions, wildcards in braces (`placement_path(results, "{trace}", ...)`), and
the report finds what the study wrote with `find_files`, which reads the same templates.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from moetuner.deployment import deployment_preset, unit_overrides
from moetuner.topology import topology_preset

StudyConfig = Mapping[str, Any]
"""A study config as Snakemake parsed it (conf/study/*.yaml), checked by moetuner.study.config."""

GridPoint = tuple[str, str, str, Any, list[str]]
"""(trace, topology, solver, replicas, evaluate_on) of one placement of a grid."""

ServePoint = tuple[str, str, Any]
"""(trace, solver, replicas) of one served placement (on the serve topology)."""


# --- which traces a study can make -------------------------------------------------------------

def real_data_path(spec: Mapping[str, Any], shared: Path) -> Path:
    """Where an `import` trace's real routing lies under the shared data folder."""
    return shared / spec["real"]


def real_data_present(spec: Mapping[str, Any], shared: Path) -> bool:
    """Every trace kind but `import` can always be made; an `import` trace needs its real data."""
    return spec["kind"] != "import" or real_data_path(spec, shared).exists()


def available_traces(traces: Mapping[str, Mapping[str, Any]], shared: Path) -> list[str]:
    """Names of the traces that can be made, in config order (a `loads` trace when the trace it is of can)."""
    made = {name for name, spec in traces.items() if spec["kind"] != "loads" and real_data_present(spec, shared)}
    return [name for name, spec in traces.items() if name in made or (spec["kind"] == "loads" and spec["of"] in made)]


def skipped_traces(traces: Mapping[str, Mapping[str, Any]], shared: Path) -> list[str]:
    """'name (missing path)' of every `import` trace whose real data is absent, in config order."""
    return [f"{name} ({real_data_path(spec, shared)})" for name, spec in traces.items()
            if not real_data_present(spec, shared)]


def one_of(names: Sequence[str]) -> str:
    """Wildcard constraint (a regex) matching exactly `names` ('^$' when none)."""
    return "|".join(re.escape(n) for n in names) or "^$"


def traces_of_kind(traces: Mapping[str, Mapping[str, Any]], *kinds: str) -> str:
    """Wildcard constraint (a regex) matching exactly the trace names of the `kinds` ('^$' when none)."""
    return one_of([n for n, s in traces.items() if s["kind"] in kinds])


ROUTING_KINDS = ("extract", "file", "import", "synth")
"""Trace kinds with token-level routing: split by `moetuner-split`; a `loads` trace's split is its `of` trace's,
the profile part turned into loads (`moetuner-import format=trace`)."""


# --- the file layout under `results` --------------------------------------------------------------

RUN = "{solver}-r{replicas}"
"""A placement's name: its solver and replica budget (`eplb-r1`)."""

LAYOUT: dict[str, str] = {
    "trace": "traces/{trace}.safetensors",
    "split": "splits/{trace}/{part}.safetensors",  # part: profile | heldout
    "profile": "profiles/{trace}/summary.json",
    "placement": f"placements/{{trace}}/{{topology}}/{RUN}.json",  # engine files beside it: .sglang.json, .vllm.json, .pt
    "simulate": f"simulate/{{trace}}/{{topology}}/{RUN}/{{evaluate_on}}/metrics.json",
    "per_layer": f"simulate/{{trace}}/{{topology}}/{RUN}/{{evaluate_on}}/per_layer.csv",
    "serve": f"serve/{{trace}}/{{topology}}/{RUN}/metrics.json",
    "online": "online/{stream}/{setting}/{policy}/metrics.json",  # setting: <topology>-r<replicas>
    # a deployment's placements, one per phase (engine files beside each), and their scores on that phase's unit
    "phase_placement": "phases/{trace}/{deployment}/{solver}/{phase}.json",
    "phase_simulate": "phases/{trace}/{deployment}/{solver}/{phase}/{evaluate_on}/metrics.json",
    "regime": "regime/regime.csv",
    "regime_figure": "regime/regime.png",
}
"""What the study writes under `results`: kind -> path template, fields in braces."""

_FIELD = re.compile(r"\{(\w+)\}")


class LayoutError(ValueError):
    """A name or path is not in the study's results layout; the message names the layout."""


def layout_path(results: str | Path, kind: str, **fields: Any) -> str:
    """results/<LAYOUT[kind] with `fields` filled in> (a field may be a Snakemake wildcard, '{trace}')."""
    return f"{results}/{LAYOUT[kind].format(**fields)}"


@cache
def _layout_regex(template: str) -> re.Pattern[str]:
    """The template as a regex: `replicas` digits, `phase` a name without dots (not an engine file's
    `decode.sglang`), other fields one path component each."""
    parts = _FIELD.split(template)  # literal, field, literal, field, ...
    pattern = {"replicas": r"\d+", "phase": r"[A-Za-z_]+"}
    return re.compile("".join(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>{pattern.get(part, '[^/]+')})"
                              for i, part in enumerate(parts)))


def parse_layout(template: str, path: str) -> dict[str, str] | None:
    """The fields of `path` (relative, '/'-separated) laid out as `template`, or None if it is not."""
    match = _layout_regex(template).fullmatch(path)
    return None if match is None else match.groupdict()


def find_files(results: str | Path, kind: str) -> list[tuple[Path, dict[str, str]]]:
    """Every file under `results` laid out as LAYOUT[kind], sorted by path, with its fields as strings;
    files the glob meets that do not parse (a placement's engine files) are left out."""
    results, template = Path(results), LAYOUT[kind]
    found = ((path, parse_layout(template, path.relative_to(results).as_posix()))
             for path in sorted(results.glob(_FIELD.sub("*", template))))
    return [(path, fields) for path, fields in found if fields is not None]


def parse_run(name: str) -> tuple[str, int]:
    """'eplb-r1' -> ('eplb', 1): a placement's name (RUN) as solver and replica budget."""
    fields = parse_layout(RUN, name)
    if fields is None:
        raise LayoutError(f"{name!r} is not named <solver>-r<replicas> (e.g. eplb-r1); use the study's layout")
    return fields["solver"], int(fields["replicas"])


def trace_path(results: str, trace: str) -> str:
    return layout_path(results, "trace", trace=trace)


def split_path(results: str, trace: str, part: str) -> str:
    """One part (`profile` or `heldout`) of a trace's split."""
    return layout_path(results, "split", trace=trace, part=part)


def profile_path(results: str, trace: str) -> str:
    return layout_path(results, "profile", trace=trace)


def placement_path(results: str, trace: str, topology: str, solver: str, replicas: Any) -> str:
    return layout_path(results, "placement", trace=trace, topology=topology, solver=solver, replicas=replicas)


def simulate_path(results: str, trace: str, topology: str, solver: str, replicas: Any, evaluate_on: str) -> str:
    return layout_path(results, "simulate", trace=trace, topology=topology, solver=solver, replicas=replicas,
                       evaluate_on=evaluate_on)


def per_layer_path(results: str, trace: str, topology: str, solver: str, replicas: Any, evaluate_on: str) -> str:
    """The simulator's per-layer table beside a simulate run's metrics."""
    return layout_path(results, "per_layer", trace=trace, topology=topology, solver=solver, replicas=replicas,
                       evaluate_on=evaluate_on)


def serve_path(results: str, trace: str, topology: str, solver: str, replicas: Any) -> str:
    return layout_path(results, "serve", trace=trace, topology=topology, solver=solver, replicas=replicas)


def online_path(results: str, stream: str, setting: str, policy: str) -> str:
    return layout_path(results, "online", stream=stream, setting=setting, policy=policy)


def regime_path(results: str) -> str:
    """The regime curve's table."""
    return layout_path(results, "regime")


def regime_figure_path(results: str) -> str:
    return layout_path(results, "regime_figure")


def evaluation_path(results: str, trace: str, evaluate_on: str) -> str:
    """What a placement of `trace` is scored on: its held-out split (`heldout`) or another trace, whole."""
    return split_path(results, trace, "heldout") if evaluate_on == "heldout" else trace_path(results, evaluate_on)


# --- re-splits ---------------------------------------------------------------------------------------

SPLIT_VARIANT = re.compile(r"(?P<trace>.+)\.split(?P<seed>\d+)")
"""A re-split's name in the layout: `<trace>.split<seed>` (`intent.split3`: intent split with seed 3). The
study's main split (`split:`'s seed) keeps the trace's own name, so the serve, online and regime stages and
every grid without `split_seeds` read the same files as before."""


def main_split_seed(config: StudyConfig) -> int:
    """The seed of the study's main split: `seed=` in `split:` (moetuner-split's default 0 without one)."""
    seeds = [str(a).split("=", 1)[1] for a in config.get("split") or [] if str(a).startswith("seed=")]
    return int(seeds[-1]) if seeds else 0


def split_variant(trace: str, seed: int, main_seed: int) -> str:
    """The layout name of `trace` split with `seed`: the trace itself for the main split, else `<trace>.split<seed>`."""
    return trace if seed == main_seed else f"{trace}.split{seed}"


def parse_split_variant(name: str) -> tuple[str, int | None]:
    """'intent.split3' -> ('intent', 3); a trace's own name -> (name, None): its main split."""
    match = SPLIT_VARIANT.fullmatch(name)
    return (name, None) if match is None else (match["trace"], int(match["seed"]))


def split_args(config: StudyConfig, name: str) -> list[str]:
    """moetuner-split overrides of a layout name: `split:` as is for a trace, its seed replaced for a re-split."""
    _, seed = parse_split_variant(name)
    if seed is None:
        return list(config["split"])
    return [*(a for a in config["split"] if not str(a).startswith("seed=")), f"seed={seed}"]


def resplit_points(config: StudyConfig, available: Sequence[str]) -> list[GridPoint]:
    """Every point of the grids with `split_seeds`, once per seed other than the main split's, its trace
    named as that re-split (split_variant), in config order: solved on the re-split's profile part and scored on
    the grid's `split_evaluate_on` (default: its `evaluate_on`; `heldout` is the re-split's held-out part)."""
    main, points = main_split_seed(config), []
    for grid in config["grids"]:
        for seed in (s for s in grid.get("split_seeds", []) if s != main):
            for trace in (t for t in grid["traces"] if t in available):
                evals = [e for e in grid.get("split_evaluate_on", grid["evaluate_on"])
                         if e == "heldout" or e in available]
                points += [(split_variant(trace, seed, main), topology, solver, replicas, evals)
                           for topology in grid["topologies"] for solver in grid["solvers"]
                           for replicas in grid["replicas"]]
    return points


def resplit_traces(config: StudyConfig, available: Sequence[str]) -> list[str]:
    """Layout names of every re-split the grids ask for, sorted, each once."""
    return sorted({point[0] for point in resplit_points(config, available)})


# --- the grids --------------------------------------------------------------------------------------

def grid_points(config: StudyConfig, available: Sequence[str]) -> list[GridPoint]:
    """Every point of the grids whose trace is available, with its available evaluations, in config order."""
    points = []
    for grid in config["grids"]:
        for trace in (t for t in grid["traces"] if t in available):
            evals = [e for e in grid["evaluate_on"] if e == "heldout" or e in available]
            for topology in grid["topologies"]:
                for solver in grid["solvers"]:
                    for replicas in grid["replicas"]:
                        points.append((trace, topology, solver, replicas, evals))
    return points


def bound_runs(config: StudyConfig, available: Sequence[str]) -> set[tuple[str, str, str, int]]:
    """With the study's `bound: true`, the simulate runs that also compute the fixed-placement lower bound on
    their held-out steps: per (trace, topology, replicas) of the grids on the main split, the first solver in
    config order. The bound depends only on the scored steps, the topology and the slots per GPU (set by the
    replica budget), the same for every solver of the setting, so it is computed once and the report divides
    it into every solver's time (collect.gap_to_bound). Empty without `bound`. {(trace, topology, solver, replicas)}"""
    if not config.get("bound"):
        return set()
    first: dict[tuple[str, str, int], str] = {}
    for trace, topology, solver, replicas, _ in grid_points(config, available):
        first.setdefault((trace, topology, int(replicas)), solver)
    return {(trace, topology, solver, replicas) for (trace, topology, replicas), solver in first.items()}


def simulate_args(config: StudyConfig, bounds: set[tuple[str, str, str, int]], trace: str, topology: str,
                  solver: str, replicas: int, evaluate_on: str) -> list[str]:
    """moetuner-simulate overrides of one run: `simulate`, then `bound=true` where it computes its setting's
    bound (`bounds`: bound_runs of the study, on held-out steps only)."""
    bound = evaluate_on == "heldout" and (trace, topology, solver, int(replicas)) in bounds
    return [*config["simulate"], *(["bound=true"] if bound else [])]


def serve_trace(config: StudyConfig, available: Sequence[str]) -> str | None:
    """The first available trace of `serve.traces`, or None."""
    return next((t for t in config["serve"]["traces"] if t in available), None)


def serve_points(config: StudyConfig, available: Sequence[str]) -> list[ServePoint]:
    """The served placements (every serve solver x replica budget of the serve trace); none without one."""
    trace, serve = serve_trace(config, available), config["serve"]
    if trace is None:
        return []
    return [(trace, solver, replicas) for solver in serve["solvers"] for replicas in serve["replicas"]]


def serve_nodes(config: StudyConfig) -> int:
    """Nodes a serve job spans: its topology preset's node count, or 1 when `emulation.enabled` (true or auto)
    runs every rank on one machine."""
    enabled = [str(a).split("=", 1)[1] for a in config["serve"]["args"] if str(a).startswith("emulation.enabled=")]
    if enabled and enabled[-1].lower() != "false":
        return 1
    return int(topology_preset(config["serve"]["topology"])["nodes"])


def simulation_targets(config: StudyConfig, available: Sequence[str], results: str) -> list[str]:
    """Simulator metrics of every grid point (and re-split point) on each of its evaluations, and of every served
    placement on its held-out split; sorted, each once."""
    topology = config["serve"]["topology"]
    points = [*grid_points(config, available), *resplit_points(config, available)]
    targets = [simulate_path(results, trace, grid_topology, solver, replicas, ev)
               for trace, grid_topology, solver, replicas, evals in points for ev in evals]
    targets += [simulate_path(results, trace, topology, solver, replicas, "heldout")
                for trace, solver, replicas in serve_points(config, available)]
    return sorted(set(targets))


def serve_targets(config: StudyConfig, available: Sequence[str], results: str) -> list[str]:
    """Serve metrics of every served placement, in config order."""
    topology = config["serve"]["topology"]
    return [serve_path(results, trace, topology, solver, replicas)
            for trace, solver, replicas in serve_points(config, available)]


def profile_targets(config: StudyConfig, available: Sequence[str], results: str) -> list[str]:
    """Profiles of the routing traces placements are solved from (grids and serving), sorted by trace."""
    solved = {point[0] for point in grid_points(config, available) if config["traces"][point[0]]["kind"] != "loads"} | \
        {point[0] for point in serve_points(config, available)}
    return [profile_path(results, trace) for trace in sorted(solved)]


# --- the regime curve -------------------------------------------------------------------------------

def regime_trace(config: StudyConfig, available: Sequence[str]) -> str | None:
    """The first available trace of `regime.traces`, or None (also without a `regime` section)."""
    return next((t for t in (config.get("regime") or {}).get("traces", []) if t in available), None)


def regime_placements(config: StudyConfig, available: Sequence[str], results: str) -> list[str]:
    """Placement files of the regime trace on the regime topologies (every solver and replica budget the
    grids solve there), sorted, each once."""
    trace = regime_trace(config, available)
    topologies = (config.get("regime") or {}).get("topologies", [])
    return sorted({placement_path(results, t, g, s, r) for t, g, s, r, _ in grid_points(config, available)
                   if t == trace and g in topologies})


# --- online rebalancing ------------------------------------------------------------------------------

def online_stream(config: StudyConfig, available: Sequence[str]) -> list[Mapping[str, Any]] | None:
    """The segments of `online.segments` if there are some and all their traces are available, else None."""
    spec = config.get("online") or {}
    segments = spec.get("segments") or []
    if not segments or any(s["trace"] not in available for s in segments):
        return None
    return segments


def online_setting(config: StudyConfig) -> str:
    """'<topology>-r<replicas>' of the online stage."""
    return f"{config['online']['topology']}-r{config['online']['replicas']}"


def online_name(segments: Sequence[Mapping[str, Any]]) -> str:
    """A stream's name: its segments' traces joined by '-'."""
    return "-".join(s["trace"] for s in segments)


def online_targets(config: StudyConfig, available: Sequence[str], results: str) -> list[str]:
    """Online metrics of every configured policy, in config order (none without a complete stream)."""
    segments = online_stream(config, available)
    if segments is None:
        return []
    return [online_path(results, online_name(segments), online_setting(config), policy)
            for policy in config["online"]["policies"]]


def online_inputs(config: StudyConfig, results: str) -> list[str]:
    """The splits the online stage reads: every segment's held-out split (the stream draws from it) and the
    first segment's profile split (the static placement is solved on it)."""
    segments = config["online"]["segments"]
    return sorted({split_path(results, s["trace"], "heldout") for s in segments}
                  | {split_path(results, segments[0]["trace"], "profile")})


def online_args(config: StudyConfig, results: str, policy: str) -> list[str]:
    """moetuner-online overrides of one policy: the stream (held-out splits and steps, drawn with
    `online.seed`), the first trace's profile split as the profile, topology, replicas, the policy, then
    `online.args` and the policy's `online.policy_args`."""
    spec = config["online"]
    segments = ",".join(f"{{trace:{split_path(results, s['trace'], 'heldout')},steps:{int(s['steps'])}}}"
                        for s in spec["segments"])
    return [f"stream.segments=[{segments}]",
            f"stream.profile={split_path(results, spec['segments'][0]['trace'], 'profile')}",
            "stream.split=null", f"stream.seed={int(spec.get('seed', 0))}",
            f"topology={spec['topology']}", f"replicas={spec['replicas']}", f"policy={policy}",
            *spec.get("args", []), *(spec.get("policy_args") or {}).get(policy, [])]


# --- phases: a deployment's prefill and decode placements -------------------------------------------

def phase_deployment(config: StudyConfig) -> str | None:
    """The deployment of the `phases` section, or None without one."""
    return (config.get("phases") or {}).get("deployment")


def phase_units(config: StudyConfig) -> list[str]:
    """The phases the study's deployment serves (its units, in `conf/deployment/<name>.yaml` order); none
    without a `phases` section."""
    name = phase_deployment(config)
    return [] if name is None else list(deployment_preset(name)["units"])


def phase_placement_path(results: str, trace: str, deployment: str, solver: str, phase: str) -> str:
    return layout_path(results, "phase_placement", trace=trace, deployment=deployment, solver=solver, phase=phase)


def phase_simulate_path(results: str, trace: str, deployment: str, solver: str, phase: str, evaluate_on: str) -> str:
    return layout_path(results, "phase_simulate", trace=trace, deployment=deployment, solver=solver, phase=phase,
                       evaluate_on=evaluate_on)


def phase_targets(config: StudyConfig, available: Sequence[str], results: str) -> list[str]:
    """Simulator metrics of every `phases` placement (trace x solver x unit) on each available evaluation of
    `phases.evaluate_on`, each on its unit, in config order; none without a `phases` section."""
    spec, deployment = config.get("phases") or {}, phase_deployment(config)
    if deployment is None:
        return []
    evals = [e for e in spec["evaluate_on"] if e == "heldout" or e in available]
    units = phase_units(config)
    return [phase_simulate_path(results, trace, deployment, solver, phase, ev)
            for trace in spec["traces"] if trace in available for solver in spec["solvers"]
            for phase in units for ev in evals]


def phase_simulate_args(config: StudyConfig, phase: str, solver: str) -> list[str]:
    """moetuner-simulate overrides that score a placement of `solver` on the deployment's `phase` unit (its
    topology, the phase and the unit's overrides of it), then `phases.simulate`. With `phases.bound`, the first
    solver's run also computes the fixed-placement lower bound (`bound=true`): it depends only on the scored
    steps, the unit's topology and its slots per GPU, the same for every solver, so it is computed once per phase
    and the report divides it into every solver's time."""
    spec, deployment = config["phases"], phase_deployment(config)
    assert deployment is not None, "phase_simulate_args needs a `phases` section"
    bound = ["bound=true"] if spec.get("bound") and solver == spec["solvers"][0] else []
    return [*unit_overrides(deployment_preset(deployment), phase), *bound, *spec.get("simulate", [])]


# --- command lines -----------------------------------------------------------------------------------

def shell_args(args: Sequence[Any]) -> str:
    """Hydra overrides from the study config as one shell-quoted string."""
    return " ".join(shlex.quote(str(a)) for a in args)
