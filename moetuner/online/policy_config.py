"""A `policy/` config as a Policy: the one place policy names and their keys are checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetuner.online.migration_aware import MigrationAware
from moetuner.online.oracle import Oracle
from moetuner.online.policies import (Periodic, Policy, PolicyError, Static, Triggered, int_option,
                                      solver_options)
from moetuner.online.stream import Stream
from moetuner.solvers.registry import get_solver

POLICIES = ("static", "periodic", "triggered", "migration_aware", "oracle")
_FIELDS = {
    "static": (),
    "periodic": ("interval_steps", "window_steps", "phase_offset_steps"),
    "triggered": ("window_steps", "check_every", "threshold"),
    "migration_aware": ("window_steps", "check_every", "horizon_steps", "min_gain", "max_moves", "sample_steps"),
}


def make_oracle(cfg: Mapping[str, Any], stream: Stream) -> Oracle:
    """`policy=oracle`: `solvers` (a non-empty list of solver names), `solver_options` per solver."""
    solvers = cfg.get("solvers")
    if isinstance(solvers, (str, bytes)) or not isinstance(solvers, (list, tuple)) or not solvers:
        raise PolicyError(f"policy.solvers={solvers!r}; give a non-empty list of solvers, e.g. [eplb, steptail]")
    for solver in solvers:
        get_solver(str(solver))  # raises UnknownSolverError naming the choices
    options = cfg.get("solver_options") or {}
    stray = sorted(set(options) - {str(s) for s in solvers}) if isinstance(options, Mapping) else []
    if not isinstance(options, Mapping) or stray:
        raise PolicyError(f"policy.solver_options: {stray or options!r}; oracle's options are per solver, keyed by "
                          f"names in policy.solvers, e.g. {{steptail: {{time_limit_s: 10}}}}")
    return Oracle(tuple(str(s) for s in solvers), {str(k): dict(v) for k, v in options.items()}, stream)


def make_policy(cfg: Mapping[str, Any], stream: Stream) -> Policy:
    """The policy a `policy/` config names; unknown names and keys raise PolicyError."""
    name = cfg.get("name")
    if name not in POLICIES:
        raise PolicyError(f"policy.name={name!r}; choose one of {list(POLICIES)}")
    allowed = {"name", "solvers", "solver_options"} if name == "oracle" else {"name", "solver", "solver_options",
                                                                                 *_FIELDS[name]}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise PolicyError(f"policy {name}: unknown key(s) {unknown}; known: {sorted(allowed)}")
    if name == "oracle":
        return make_oracle(cfg, stream)
    solver = str(cfg.get("solver", "eplb"))
    get_solver(solver)  # raises UnknownSolverError naming the choices
    common = {"solver": solver, "options": solver_options(cfg)}
    if name == "static":
        return Static(**common)
    if name == "periodic":
        interval = int_option(cfg, "interval_steps")
        offset = int_option(cfg, "phase_offset_steps", low=0) if "phase_offset_steps" in cfg else 0
        if offset >= interval:
            raise PolicyError(f"policy.phase_offset_steps={offset}; it must be below interval_steps={interval} "
                              f"(re-solves happen before steps offset + k x interval)")
        return Periodic(**common, interval_steps=interval, window_steps=int_option(cfg, "window_steps"),
                        phase_offset_steps=offset)
    if name == "triggered":
        threshold = float(cfg.get("threshold", 0))
        if threshold <= 1.0:
            raise PolicyError(f"policy.threshold={threshold}; imbalance is max/mean >= 1, choose a value > 1")
        return Triggered(**common, window_steps=int_option(cfg, "window_steps"), check_every=int_option(cfg, "check_every"),
                         threshold=threshold)
    min_gain = float(cfg.get("min_gain", 0.0))
    if not 0.0 <= min_gain < 1.0:
        raise PolicyError(f"policy.min_gain={min_gain}; a share of a step's time in [0, 1)")
    return MigrationAware(**common, window_steps=int_option(cfg, "window_steps"), check_every=int_option(cfg, "check_every"),
                          horizon_steps=int_option(cfg, "horizon_steps"), min_gain=min_gain,
                          max_moves=int_option(cfg, "max_moves", low=0),
                          sample_steps=int_option(cfg, "sample_steps") if "sample_steps" in cfg else 32)
