"""Decision time as a stated model: the work a decision did, counted, times a cost per unit of work.

A policy's decision is charged `sum over units of count x seconds per unit`, with the unit costs measured
once and written in conf/online.yaml (`decision_cost`, beside the command that measured them:
benchmarks/decision_cost.py). The same inputs therefore give the same replay on any machine and at any
load, which a clock read around the call does not (tests/test_online.py replays under a busy CPU).

Units, counted while a policy decides (`Context.work`, `Served`, `StepTimes.priced_layer_steps`):
- `solve_layers.<solver>`: layers placed by `solver` (one solve of an [L, E] load counts L);
- `priced_layer_steps`: layer-steps whose simulated time the decision read (cached or not: an engine
  computes them);
- `load_layer_steps`: layer-steps of load counters read;
- `migration_layers`: layers the migration planner compared (one plan of [L, P] maps counts L);
- `proxy_slot_steps`: migration_aware's load proxy, candidates x steps x slots evaluated;
- `candidate_layers`: migration_aware's relabelled and re-packed candidate layers built.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UNITS = ("priced_layer_steps", "load_layer_steps", "migration_layers", "proxy_slot_steps", "candidate_layers")
SOLVE = "solve_layers."  # + the solver's name


class DecisionCostError(ValueError):
    """A decision-cost config is malformed or lacks a unit that a decision counted; the message names the fix."""


@dataclass(frozen=True)
class DecisionCost:
    """Seconds per unit of counted work (module doc)."""

    per_unit: Mapping[str, float]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DecisionCost:
        """`decision_cost` of conf/online.yaml: {unit: seconds, ..., solve_layers: {solver: seconds}}."""
        flat: dict[str, float] = {}
        for key, value in dict(cfg).items():
            if key == "solve_layers":
                flat.update({f"{SOLVE}{s}": v for s, v in dict(value).items()})
            elif key in UNITS:
                flat[key] = value
            elif key != "measured_by":
                raise DecisionCostError(f"decision_cost.{key}: unknown unit; known: {[*UNITS, 'solve_layers']}")
        for key, value in flat.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise DecisionCostError(f"decision_cost {key}={value!r}; seconds per unit, a number >= 0")
        return cls({k: float(v) for k, v in flat.items()})

    def check_solver(self, solver: str) -> None:
        """Raise DecisionCostError, before a replay, if a policy re-solving with `solver` could not be priced."""
        self.seconds({SOLVE + solver: 1})

    def seconds(self, work: Mapping[str, int]) -> float:
        """The charged seconds of `work` (units -> counts)."""
        missing = sorted(u for u, n in work.items() if n and u not in self.per_unit)
        if missing:
            raise DecisionCostError(
                f"decision_cost has no cost for {missing}; measure it with benchmarks/decision_cost.py "
                f"(--solvers for a solve_layers.<solver> unit) and add it to conf/online.yaml decision_cost")
        return float(sum(n * self.per_unit[u] for u, n in sorted(work.items()) if n))


def work_between(before: Mapping[str, int], after: Mapping[str, int]) -> Counter[str]:
    """The units counted from `before` to `after` (both running totals)."""
    return Counter({u: after[u] - before.get(u, 0) for u in after if after[u] != before.get(u, 0)})
