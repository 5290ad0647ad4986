# Shared helpers: the study grid (config, defined once) expanded into targets, paths, and app commands.
import re
import shlex
import sys

from moetuner.study_config import check_study_config

check_study_config(config, PROJECT)  # fails at parse time, naming the setting to change
RESULTS = config["results"]
SHARED = (PROJECT / config["shared_data"]).resolve()
TRACES = config["traces"]


def real_data_present(spec):
    return spec["kind"] != "import" or (SHARED / spec["real"]).exists()


AVAILABLE = [name for name, spec in TRACES.items() if real_data_present(spec)]
SKIPPED = [f"{name} ({SHARED / spec['real']})" for name, spec in TRACES.items() if not real_data_present(spec)]
if SKIPPED:
    print(f"moetuner study: real data not found, skipped: {', '.join(SKIPPED)}", file=sys.stderr)


wildcard_constraints:
    trace="[A-Za-z0-9_.-]+",
    eval="[A-Za-z0-9_.-]+",
    topology="[A-Za-z0-9_]+",
    solver="[a-z_]+",
    replicas="[0-9]+",


def trace_path(name):
    return f"{RESULTS}/traces/{name}.safetensors"


def placement_path(trace, topology, solver, replicas):
    return f"{RESULTS}/placements/{trace}/{topology}/{solver}-r{replicas}.json"


def shipped_trace_file(wildcards):
    """The repository file a `file` trace is copied from (its path is relative to the project root)."""
    return str(PROJECT / TRACES[wildcards.trace]["path"])


def traces_of_kind(kind):
    """Wildcard constraint matching exactly the trace names of `kind` (nothing when there are none)."""
    return "|".join(re.escape(n) for n, s in TRACES.items() if s["kind"] == kind) or "^$"


def extract_model(wildcards):
    """The checkpoint folder a preset trace is extracted from."""
    return f"{RESULTS}/models/{TRACES[wildcards.trace]['preset']}"


def evaluation_trace(wildcards):
    """What a placement is scored on: its trace's held-out part, or another domain's whole trace."""
    if wildcards.eval == "heldout":
        return f"{RESULTS}/splits/{wildcards.trace}/heldout.safetensors"
    return trace_path(wildcards.eval)


def grid_points():
    """(trace, topology, solver, replicas, evaluate_on) of every available point of the grids."""
    points = []
    for grid in config["grids"]:
        for trace in (t for t in grid["traces"] if t in AVAILABLE):
            evals = [e for e in grid["evaluate_on"] if e == "heldout" or e in AVAILABLE]
            for topology in grid["topologies"]:
                for solver in grid["solvers"]:
                    for replicas in grid["replicas"]:
                        points.append((trace, topology, solver, replicas, evals))
    return points


def serve_trace():
    """The first available trace listed for serving, or None."""
    return next((t for t in config["serve"]["traces"] if t in AVAILABLE), None)


def serve_points():
    """(trace, solver, replicas) served on config['serve']['topology']."""
    trace, serve = serve_trace(), config["serve"]
    if trace is None:
        return []
    return [(trace, solver, replicas) for solver in serve["solvers"] for replicas in serve["replicas"]]


def serve_nodes():
    """Nodes a serve job spans: the topology's node count, or 1 when the emulation runs every rank here."""
    import yaml

    enabled = [a.split("=", 1)[1] for a in config["serve"]["args"] if str(a).startswith("emulation.enabled=")]
    if enabled and enabled[-1].lower() != "false":
        return 1
    return int(yaml.safe_load((PROJECT / "conf" / "topology" / f"{config['serve']['topology']}.yaml").read_text())["nodes"])


def simulation_targets():
    targets = [f"{RESULTS}/simulate/{trace}/{topology}/{solver}-r{replicas}/{ev}/metrics.json"
               for trace, topology, solver, replicas, evals in grid_points() for ev in evals]
    targets += [f"{RESULTS}/simulate/{trace}/{config['serve']['topology']}/{solver}-r{replicas}/heldout/metrics.json"
                for trace, solver, replicas in serve_points()]
    return sorted(set(targets))


def serve_targets():
    return [f"{RESULTS}/serve/{trace}/{config['serve']['topology']}/{solver}-r{replicas}/metrics.json"
            for trace, solver, replicas in serve_points()]


def regime_trace():
    """The first available trace of the config's `regime.traces`, or None."""
    return next((t for t in (config.get("regime") or {}).get("traces", []) if t in AVAILABLE), None)


def regime_placements():
    """Placement JSONs of the regime trace on the regime topologies (every solver and replica budget solved)."""
    trace, topologies = regime_trace(), (config.get("regime") or {}).get("topologies", [])
    return sorted({placement_path(t, g, s, r) for t, g, s, r, _ in grid_points() if t == trace and g in topologies})


def profile_targets():
    """Profiles of the traces placements are solved from."""
    solved = {point[0] for point in grid_points()} | {point[0] for point in serve_points()}
    return [f"{RESULTS}/profiles/{trace}/summary.json" for trace in sorted(solved)]


def app(rule_name, wildcards):
    """Command prefix that runs an app as a child of the study's MLflow parent run."""
    pairs = ",".join(f"{k}={v}" for k, v in wildcards.items())
    return f"python -m moetuner.study job --results {shlex.quote(RESULTS)} --rule {rule_name} --wildcards '{pairs}' --"


def overrides(args):
    """Hydra overrides from the study config, shell-quoted."""
    return " ".join(shlex.quote(str(a)) for a in args)


def log_path(rule_name, name):
    return f"{RESULTS}/logs/{rule_name}/{name}.log"


def bench_path(rule_name, name):
    return f"{RESULTS}/benchmarks/{rule_name}/{name}.tsv"


# Online rebalancing (config `online:`, rule online in online.smk)
def online_stream():
    """The configured stream if all its traces are available, else None."""
    spec = config.get("online") or {}
    segments = spec.get("segments") or []
    if not segments or any(s["trace"] not in AVAILABLE for s in segments):
        return None
    return segments


def online_setting():
    return f"{config['online']['topology']}-r{config['online']['replicas']}"


def online_name():
    return "-".join(s["trace"] for s in online_stream())


def online_targets():
    """metrics.json of every configured policy (none when a trace of the stream is unavailable)."""
    if online_stream() is None:
        return []
    known = sorted(p.stem for p in (PROJECT / "conf" / "policy").glob("*.yaml"))
    unknown = [p for p in config["online"]["policies"] if p not in known]
    if unknown:
        raise ValueError(f"online.policies: unknown policy {unknown}; choose from {known}")
    return [f"{RESULTS}/online/{online_name()}/{online_setting()}/{policy}/metrics.json"
            for policy in config["online"]["policies"]]


def online_overrides(wildcards):
    spec = config["online"]
    segments = ",".join(f"{{trace:{trace_path(s['trace'])},steps:{int(s['steps'])}}}" for s in spec["segments"])
    args = [f"stream.segments=[{segments}]", f"profile={trace_path(spec['segments'][0]['trace'])}",
            f"topology={spec['topology']}", f"replicas={spec['replicas']}", f"policy={wildcards.policy}",
            *spec.get("args", []), *(spec.get("policy_args") or {}).get(wildcards.policy, [])]
    return overrides(args)
