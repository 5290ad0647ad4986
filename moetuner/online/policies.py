"""Rebalancing policies. A policy sees only the steps already served (`Served`), except `oracle`.

- `static`: `solver` on the profile, once.
- `periodic` (vLLM / SGLang EPLB): every `interval_steps` (at steps phase_offset_steps + k x interval_steps),
  `solver` on the last `window_steps` steps, migrated as solved (no relabelling, like vLLM's rearrangement).
- `triggered`: every `check_every` steps, re-solve when the current placement's imbalance (max / mean
  tokens per GPU, mean over layers) over the last `window_steps` steps passes `threshold`.
- `migration_aware` (ours): `moetuner.online.migration_aware`.
- `oracle` (a hindsight reference): `moetuner.online.oracle`, the best placement per segment in hindsight.

Load-only solvers (the registry entries marked `load_only`, moetuner.solvers.registry) get the window's
tokens per expert from the stream's per-step counters, as an engine's load counters hold them; other
solvers get the window's tokens.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from moetuner.online.decision_time import SOLVE, DecisionCost
from moetuner.online.migration import Migration, MigrationConfig, plan_migration
from moetuner.online.steptimes import StepTimes
from moetuner.online.stream import Stream
from moetuner.placement import gpu_loads
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement, solver_info
from moetuner.profiling.stats import imbalance as gpu_imbalance
from moetuner.topology import Topology
from moetuner.trace import Trace


class PolicyError(ValueError):
    """A policy config is malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class Decision:
    """A new placement to migrate to."""

    phy2log: np.ndarray  # [L, P]
    solver: str
    solve_seconds: float
    free: bool = False  # decided in hindsight: no decision time charged (oracle only; its migration is charged)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What every policy may use: topology, replica budget, solver, simulator cache, migration model, and
    what prices a decision: the work counted so far (`work`, running totals by unit) and the cost per unit
    (`decision_cost`; moetuner.online.decision_time)."""

    topology: Topology
    replicas: int
    step_times: StepTimes
    migration: MigrationConfig
    bytes_per_expert: float
    decision_cost: DecisionCost
    work: Counter[str] = field(default_factory=Counter)

    def work_done(self) -> Counter[str]:
        """Running totals of every counted unit, the simulator's priced layer-steps included."""
        return Counter({**self.work, "priced_layer_steps": self.step_times.priced_layer_steps})

    def problem(self, trace: Trace) -> PlacementProblem:
        return PlacementProblem(trace, self.topology, replicas=self.replicas,
                                step_tokens=self.step_times.stream.step_tokens,
                                dispatch=self.step_times.dispatch, dataflow=self.step_times.dataflow)

    def solve(self, trace: Trace, solver: str, options: Mapping[str, Any]) -> Decision:
        """`solver` on the tokens of `trace`, as moetuner-solve would place them, for the replay's dispatch
        and dataflow."""
        start = time.perf_counter()
        placement = solve_placement(self.problem(trace), solver, options)
        self.work[SOLVE + solver] += trace.num_layers
        return Decision(placement.phy2log, solver, time.perf_counter() - start)

    def solve_steps(self, steps: np.ndarray, solver: str, options: Mapping[str, Any]) -> Decision:
        """`solver` on stream steps `steps` [n]: from their expert loads for a load-only solver, else their
        tokens."""
        stream = self.step_times.stream
        if not solver_info(solver).load_only:
            return self.solve(stream.tokens_of(steps), solver, options)
        start = time.perf_counter()
        problem = self.problem(stream.tokens_of(steps[-1:]))  # one step's tokens: the model's metadata
        object.__setattr__(problem, "load", stream.loads[steps].sum(0, dtype=np.int64).astype(float))  # [L, E]
        placement = solve_placement(problem, solver, options)
        self.work["load_layer_steps"] += len(steps) * problem.load.shape[0]
        self.work[SOLVE + solver] += problem.load.shape[0]
        return Decision(placement.phy2log, solver, time.perf_counter() - start)

    def migration_of(self, old: np.ndarray, new: np.ndarray) -> Migration:
        self.work["migration_layers"] += len(old)
        return plan_migration(old, new, self.topology.num_gpus, self.step_times.cost, self.bytes_per_expert)


class Served:
    """The steps served so far (0 .. upto-1): the only routing a (non-oracle) policy can read; the load
    layer-steps read are counted in `work` (the decision's charged work)."""

    def __init__(self, stream: Stream, upto: int, work: Counter[str] | None = None) -> None:
        self._stream, self.upto = stream, int(upto)
        self.work = Counter() if work is None else work

    def __len__(self) -> int:
        return self.upto

    def window(self, steps: int) -> np.ndarray:
        """The last `steps` served steps (fewer at the start). [<= steps]"""
        return np.arange(max(0, self.upto - steps), self.upto)

    def _check(self, steps: np.ndarray) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.int64)
        unseen = steps[(steps < 0) | (steps >= self.upto)]
        assert not len(unseen), f"a policy asked for steps not served yet: {unseen[:3].tolist()}"
        return steps

    def tokens(self, steps: np.ndarray) -> Trace:
        return self._stream.tokens_of(self._check(steps))

    def loads(self, steps: np.ndarray) -> np.ndarray:
        """Tokens per expert of each step. [W, L, E]"""
        got = self._stream.loads[self._check(steps)].astype(float)
        self.work["load_layer_steps"] += got.shape[0] * got.shape[1]
        return got

    def solve(self, ctx: Context, steps: np.ndarray, solver: str, options: Mapping[str, Any]) -> Decision:
        return ctx.solve_steps(self._check(steps), solver, options)

    def layer_times(self, times: StepTimes, phy2log: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Mean simulated per-layer time of served steps `steps` under phy2log. [L]"""
        return times.mean_layers(phy2log, self._check(steps))


class Policy(Protocol):
    name: str

    def initial(self, ctx: Context, profile: Trace) -> Decision: ...

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        """Called before serving step `step` (>= 1); `served` holds steps 0 .. step-1."""
        ...


def solver_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return dict(cfg.get("solver_options") or {})


def int_option(cfg: Mapping[str, Any], key: str, low: int = 1) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PolicyError(f"policy.{key}={value!r}; it must be an integer >= {low}")
    return value


@dataclass
class Static:
    solver: str
    options: dict[str, Any]
    name: str = "static"

    def initial(self, ctx: Context, profile: Trace) -> Decision:
        return ctx.solve(profile, self.solver, self.options)

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        return None


@dataclass
class Periodic(Static):
    interval_steps: int = 24
    window_steps: int = 8
    phase_offset_steps: int = 0  # re-solves before steps phase_offset_steps + k * interval_steps (> 0)
    name: str = "periodic"

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        if (step - self.phase_offset_steps) % self.interval_steps:
            return None
        return served.solve(ctx, served.window(self.window_steps), self.solver, self.options)


def imbalance(phy2log: np.ndarray, load: np.ndarray, num_gpus: int) -> float | np.ndarray:
    """max / mean tokens per GPU, mean over layers: the peak-to-average GPU load that the MoE
    load-balancing competitions score; one value per leading index of `load` (e.g. per step).
    phy2log [L, P], load [..., L, E] -> [...]"""
    got = gpu_imbalance(gpu_loads(phy2log, load, num_gpus)).mean(-1)
    return float(got) if got.ndim == 0 else got


@dataclass
class Triggered(Static):
    window_steps: int = 8
    check_every: int = 4
    threshold: float = 1.2
    name: str = "triggered"
    last: int = 0

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        if step % self.check_every or step - self.last < self.window_steps:
            return None
        window = served.window(self.window_steps)
        if imbalance(current, served.loads(window).sum(0), ctx.topology.num_gpus) <= self.threshold:
            return None
        self.last = step
        return served.solve(ctx, window, self.solver, self.options)


# ---------------------------------------------------------------- migration_aware
