"""The study grid (`conf/study/*.yaml`) expanded into the files the Snakemake rules make.

Pure functions of the study config, the names of the traces that are available (an `import` trace
whose real data is absent is skipped) and the results folder; `workflow/rules/common.smk` binds them
to the parsed config. The file layout under `results` is defined here once: the rules name their
outputs with the same path functions, wildcards in braces (`placement_path(results, "{trace}", ...)`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def traces_of_kind(traces: Mapping[str, Mapping[str, Any]], *kinds: str) -> str:
    """Wildcard constraint (a regex) matching exactly the trace names of the `kinds` ('^$' when none)."""
    return "|".join(re.escape(n) for n, s in traces.items() if s["kind"] in kinds) or "^$"


ROUTING_KINDS = ("extract", "file", "import", "synth")
"""Trace kinds with token-level routing: split by `moetuner-split`; a `loads` trace's split is its `of` trace's,
the profile part turned into loads (`moetuner-import format=trace`)."""


# --- the file layout under `results` --------------------------------------------------------------

def trace_path(results: str, trace: str) -> str:
    return f"{results}/traces/{trace}.safetensors"


def split_path(results: str, trace: str, part: str) -> str:
    """One part (`profile` or `heldout`) of a trace's split."""
    return f"{results}/splits/{trace}/{part}.safetensors"


def profile_path(results: str, trace: str) -> str:
    return f"{results}/profiles/{trace}/summary.json"


def placement_path(results: str, trace: str, topology: str, solver: str, replicas: Any) -> str:
    return f"{results}/placements/{trace}/{topology}/{solver}-r{replicas}.json"


def simulate_path(results: str, trace: str, topology: str, solver: str, replicas: Any, evaluate_on: str) -> str:
    return f"{results}/simulate/{trace}/{topology}/{solver}-r{replicas}/{evaluate_on}/metrics.json"


def serve_path(results: str, trace: str, topology: str, solver: str, replicas: Any) -> str:
    return f"{results}/serve/{trace}/{topology}/{solver}-r{replicas}/metrics.json"


def online_path(results: str, stream: str, setting: str, policy: str) -> str:
    return f"{results}/online/{stream}/{setting}/{policy}/metrics.json"


def evaluation_path(results: str, trace: str, evaluate_on: str) -> str:
    """What a placement of `trace` is scored on: its held-out split (`heldout`) or another trace, whole."""
    return split_path(results, trace, "heldout") if evaluate_on == "heldout" else trace_path(results, evaluate_on)


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
    """Simulator metrics of every grid point on each of its evaluations, and of every served placement on
    its held-out split; sorted, each once."""
    topology = config["serve"]["topology"]
    targets = [simulate_path(results, trace, grid_topology, solver, replicas, ev)
               for trace, grid_topology, solver, replicas, evals in grid_points(config, available) for ev in evals]
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


# --- command lines -----------------------------------------------------------------------------------

def shell_args(args: Sequence[Any]) -> str:
    """Hydra overrides from the study config as one shell-quoted string."""
    return " ".join(shlex.quote(str(a)) for a in args)
