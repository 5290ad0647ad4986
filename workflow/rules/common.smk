# Shared helpers: the study config checked, its grid expanded into targets (moetuner.study.targets), and
# the rules' paths and app commands bound to this config.
import shlex
import sys

from moetuner.study import targets
from moetuner.study.config import check_study_config
from moetuner.study.jobs import job_prefix

check_study_config(config, PROJECT)  # fails at parse time, naming the setting to change
RESULTS = config["results"]
SHARED = (PROJECT / config["shared_data"]).resolve()
TRACES = config["traces"]
AVAILABLE = targets.available_traces(TRACES, SHARED)
SKIPPED = targets.skipped_traces(TRACES, SHARED)
if SKIPPED:
    print(f"moetuner study: real data not found, skipped: {', '.join(SKIPPED)}", file=sys.stderr)

SIMULATION_TARGETS = targets.simulation_targets(config, AVAILABLE, RESULTS)
SERVE_TARGETS = targets.serve_targets(config, AVAILABLE, RESULTS)
PROFILE_TARGETS = targets.profile_targets(config, AVAILABLE, RESULTS)
REGIME_TRACE = targets.regime_trace(config, AVAILABLE)
REGIME_PLACEMENTS = targets.regime_placements(config, AVAILABLE, RESULTS)
ONLINE_TARGETS = targets.online_targets(config, AVAILABLE, RESULTS)
RESPLITS = targets.resplit_traces(config, AVAILABLE)  # `<trace>.split<seed>`: the grids' `split_seeds`
PHASE_TARGETS = targets.phase_targets(config, AVAILABLE, RESULTS)  # the `phases` section: one deployment
PHASE_UNITS = targets.phase_units(config)
BOUND_RUNS = targets.bound_runs(config, AVAILABLE)  # `bound: true`: the simulate run of each setting that bounds it


wildcard_constraints:
    trace="[A-Za-z0-9_.-]+",
    eval="[A-Za-z0-9_.-]+",
    topology="[A-Za-z0-9_]+",
    solver="[a-z_]+",
    replicas="[0-9]+",
    deployment="[A-Za-z0-9_]+",
    phase=targets.one_of(PHASE_UNITS),


def trace_path(name):
    return targets.trace_path(RESULTS, name)


def split_path(trace, part):
    return targets.split_path(RESULTS, trace, part)


def placement_path(trace, topology, solver, replicas):
    return targets.placement_path(RESULTS, trace, topology, solver, replicas)


def shipped_trace_file(wildcards):
    """The repository file a `file` trace is copied from (its path is relative to the project root)."""
    return str(PROJECT / TRACES[wildcards.trace]["path"])


def traces_of_kind(*kinds):
    return targets.traces_of_kind(TRACES, *kinds)


def extract_model(wildcards):
    """The checkpoint folder a preset trace is extracted from."""
    return f"{RESULTS}/models/{TRACES[wildcards.trace]['preset']}"


def evaluation_trace(wildcards):
    return targets.evaluation_path(RESULTS, wildcards.trace, wildcards.eval)


def app(rule_name, wildcards):
    """Command prefix that runs an app as a child of the study's MLflow parent run."""
    return job_prefix(RESULTS, rule_name, dict(wildcards.items()))


def overrides(args):
    return targets.shell_args(args)


def log_path(rule_name, name):
    return f"{RESULTS}/logs/{rule_name}/{name}.log"


def bench_path(rule_name, name):
    return f"{RESULTS}/benchmarks/{rule_name}/{name}.tsv"


def online_inputs(wildcards):
    return targets.online_inputs(config, RESULTS)


def online_overrides(wildcards):
    return overrides(targets.online_args(config, RESULTS, wildcards.policy))
