"""A `policy/` config as a Policy: the one place policy names and their keys are checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetuner.online.migration_aware import MigrationAware
from moetuner.online.policies import (Oracle, Periodic, Policy, PolicyError, Static, Triggered, int_option,
                                      solver_options)
from moetuner.online.stream import Stream
from moetuner.solvers.registry import get_solver

POLICIES = ("static", "periodic", "triggered", "migration_aware", "oracle")
_FIELDS = {
    "static": (), "oracle": (),
    "periodic": ("interval_steps", "window_steps"),
    "triggered": ("window_steps", "check_every", "threshold"),
    "migration_aware": ("window_steps", "check_every", "horizon_steps", "min_gain", "max_moves", "sample_steps"),
}


def make_policy(cfg: Mapping[str, Any], stream: Stream) -> Policy:
    """The policy a `policy/` config names; unknown names and keys raise PolicyError."""
    name = cfg.get("name")
    if name not in POLICIES:
        raise PolicyError(f"policy.name={name!r}; choose one of {list(POLICIES)}")
    allowed = {"name", "solver", "solver_options", *_FIELDS[name]}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise PolicyError(f"policy {name}: unknown key(s) {unknown}; known: {sorted(allowed)}")
    solver = str(cfg.get("solver", "eplb"))
    get_solver(solver)  # raises UnknownSolverError naming the choices
    common = {"solver": solver, "options": solver_options(cfg)}
    if name == "static":
        return Static(**common)
    if name == "oracle":
        return Oracle(**common, stream=stream)
    if name == "periodic":
        return Periodic(**common, interval_steps=int_option(cfg, "interval_steps"), window_steps=int_option(cfg, "window_steps"))
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
