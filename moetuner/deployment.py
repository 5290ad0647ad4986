"""Deployments (Hydra group `deployment/`): a model served disaggregated, one cluster unit per phase.

A deployment names the model shape it is for (experts, top-k, MoE layers; `synthetic` when its traces are
synthetic) and, per phase, the unit that serves it: a topology preset (`conf/topology/<name>.yaml`), the
expert slots per GPU (routed experts per GPU; the slots beyond ceil(E / G) are redundant experts, i.e.
`replicas`) and overrides of the phase preset (`conf/phase/<phase>.yaml`). `moetuner-solve deployment=NAME`
solves one placement per unit (moetuner/apps/solve.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moetuner import conf_preset
from moetuner.phase import PHASES, Phase, phase_from_config
from moetuner.topology import Topology, topology_from_config, topology_preset
from moetuner.trace import Trace


class DeploymentError(ValueError):
    """A deployment is inconsistent, or does not fit a trace; the message names the problem and the fix."""


def phase_preset(name: str) -> dict[str, Any]:
    """The preset `conf/phase/<name>.yaml` as a plain dict."""
    if name not in PHASES:
        raise DeploymentError(f"unknown phase {name!r} in a deployment; its units are named by phase: {list(PHASES)}")
    return conf_preset("phase", name, DeploymentError)


def deployment_preset(name: str) -> dict[str, Any]:
    """The preset `conf/deployment/<name>.yaml` as a plain dict."""
    return conf_preset("deployment", name, DeploymentError)


def unit_overrides(cfg: Mapping[str, Any], phase: str) -> list[str]:
    """Hydra overrides that score a placement on a deployment's `phase` unit (`moetuner-simulate`): its
    topology, the phase preset and the unit's overrides of it. cfg: a deployment config."""
    units = dict(cfg.get("units") or {})
    if phase not in units:
        raise DeploymentError(f"deployment {cfg.get('name')!r} has no {phase} unit (units: {sorted(units)}); "
                              f"name a phase it serves")
    unit = units[phase]
    return [f"topology={unit['topology']}", f"phase={phase}",
            *(f"phase.{key}={'null' if value is None else value}" for key, value in (unit.get("phase") or {}).items())]


@dataclass(frozen=True)
class Unit:
    """The cluster serving one phase: `topology`, `slots_per_gpu` expert slots per GPU per layer."""

    phase: Phase
    topology: Topology
    slots_per_gpu: int

    def replicas(self, num_experts: int) -> int:
        """Redundant slots per GPU: slots_per_gpu - ceil(E / G); raises where the slots cannot hold E experts."""
        need = math.ceil(num_experts / self.topology.num_gpus)
        if self.slots_per_gpu < need:
            raise DeploymentError(
                f"{self.phase.name} unit on {self.topology.name}: {num_experts} experts on {self.topology.num_gpus} "
                f"GPUs need at least {need} slots per GPU, the deployment gives slots_per_gpu={self.slots_per_gpu}; "
                f"raise slots_per_gpu or use a topology with more GPUs")
        return self.slots_per_gpu - need

    def redundant_experts(self, num_experts: int) -> int:
        """Physical slots beyond one per expert: G * slots_per_gpu - E."""
        self.replicas(num_experts)
        return self.topology.num_gpus * self.slots_per_gpu - num_experts


@dataclass(frozen=True)
class Deployment:
    """A model shape (`num_experts`, `top_k`, `num_moe_layers`) and the unit serving each phase."""

    name: str
    model: str
    synthetic: bool
    num_experts: int
    top_k: int
    num_moe_layers: int
    units: dict[str, Unit]
    traces: str = ""  # how to get traces of this shape (named in errors)

    def check_trace(self, trace: Trace) -> None:
        """Raise DeploymentError unless `trace` has the deployment's experts, top-k and MoE layers."""
        have = (trace.num_experts, trace.top_k, trace.num_layers)
        want = (self.num_experts, self.top_k, self.num_moe_layers)
        if have != want:
            raise DeploymentError(
                f"trace {trace.source!r} has (experts, top_k, MoE layers) = {have}, but deployment {self.name} is "
                f"for {self.model} with {want}; give a trace of that model ({self.traces})")
        for unit in self.units.values():
            unit.replicas(self.num_experts)


def unit_from_config(phase: str, cfg: Mapping[str, Any]) -> Unit:
    """A Unit from a deployment's `units.<phase>` block: topology (preset name), slots_per_gpu, phase overrides."""
    for key in ("topology", "slots_per_gpu"):
        if key not in cfg:
            raise DeploymentError(f"deployment unit {phase!r} has no {key}; give units.{phase}.{key}")
    settings = {**phase_preset(phase), **dict(cfg.get("phase") or {})}
    if settings["name"] != phase:
        raise DeploymentError(f"deployment unit {phase!r} overrides its phase name to {settings['name']!r}; "
                              f"a unit serves the phase it is named by")
    unit = Unit(phase_from_config(settings), topology_from_config(topology_preset(str(cfg["topology"]))),
                int(cfg["slots_per_gpu"]))
    if unit.slots_per_gpu < 1:
        raise DeploymentError(f"deployment unit {phase!r}: slots_per_gpu={unit.slots_per_gpu} must be >= 1")
    return unit


def deployment_from_config(cfg: Mapping[str, Any]) -> Deployment:
    """A Deployment from a `deployment/` config; every unit is checked to hold the model's experts."""
    units = dict(cfg.get("units") or {})
    unknown = sorted(set(units) - set(PHASES))
    if unknown or not units:
        raise DeploymentError(f"deployment {cfg.get('name')!r}: units {sorted(units)}; name each unit by its "
                              f"phase, one of {list(PHASES)}")
    deployment = Deployment(
        name=str(cfg["name"]), model=str(cfg["model"]), synthetic=bool(cfg["synthetic"]),
        num_experts=int(cfg["num_experts"]), top_k=int(cfg["top_k"]), num_moe_layers=int(cfg["num_moe_layers"]),
        units={phase: unit_from_config(phase, units[phase]) for phase in PHASES if phase in units},
        traces=str(cfg.get("traces", "")))
    for unit in deployment.units.values():
        unit.replicas(deployment.num_experts)
    return deployment
