# Shared helpers: the study grid (config, defined once) expanded into targets, paths, and app commands.
import re
import shlex
import sys

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


def simulation_targets():
    targets = [f"{RESULTS}/simulate/{trace}/{topology}/{solver}-r{replicas}/{ev}/metrics.json"
               for trace, topology, solver, replicas, evals in grid_points() for ev in evals]
    targets += [f"{RESULTS}/simulate/{trace}/{config['serve']['topology']}/{solver}-r{replicas}/heldout/metrics.json"
                for trace, solver, replicas in serve_points()]
    return sorted(set(targets))


def serve_targets():
    return [f"{RESULTS}/serve/{trace}/{config['serve']['topology']}/{solver}-r{replicas}/metrics.json"
            for trace, solver, replicas in serve_points()]


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
