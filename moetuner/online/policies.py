"""Rebalancing policies. A policy sees only the steps already served (`Served`), except `oracle`.

- `static`: `solver` on the profile, once.
- `periodic` (vLLM / SGLang EPLB): every `interval_steps`, `solver` on the last `window_steps` steps,
  migrated as solved (no relabelling, like vLLM's rearrangement).
- `triggered`: every `check_every` steps, re-solve when the current placement's imbalance (max / mean
  tokens per GPU, mean over layers) over the last `window_steps` steps passes `threshold`.
- `migration_aware` (ours): `moetuner.online.migration_aware`.
- `oracle` (a hindsight reference, not a bound): each segment's `solver` placement on that segment's
  own steps, switched in at the segment's first step at no cost.

Load-only solvers (LOAD_SOLVERS) get the window's tokens per expert from the stream's per-step counters,
as an engine's load counters hold them; other solvers get the window's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from moetuner.online.migration import Migration, MigrationConfig, plan_migration
from moetuner.online.steptimes import StepTimes
from moetuner.online.stream import Stream
from moetuner.placement import gpu_loads
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
from moetuner.profiling.stats import imbalance as gpu_imbalance
from moetuner.topology import Topology
from moetuner.trace import Trace


LOAD_SOLVERS = ("eplb", "eplb_node_groups", "greedy", "contiguous", "round_robin")  # read only PlacementProblem.load


class PolicyError(ValueError):
    """A policy config is malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class Decision:
    """A new placement to migrate to."""

    phy2log: np.ndarray  # [L, P]
    solver: str
    solve_seconds: float
    free: bool = False  # switched in at no cost (oracle only)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What every policy may use: topology, replica budget, solver, simulator cache, migration model, and
    the clock that times decisions (injectable for tests)."""

    topology: Topology
    replicas: int
    step_times: StepTimes
    migration: MigrationConfig
    bytes_per_expert: float
    clock: Callable[[], float] = time.process_time  # CPU seconds: wall time on an idle machine

    def problem(self, trace: Trace) -> PlacementProblem:
        return PlacementProblem(trace, self.topology, replicas=self.replicas,
                                step_tokens=self.step_times.stream.step_tokens,
                                dispatch=self.step_times.dispatch, dataflow=self.step_times.dataflow)

    def solve(self, trace: Trace, solver: str, options: Mapping[str, Any]) -> Decision:
        """`solver` on the tokens of `trace`, as moetuner-solve would place them, for the replay's dispatch
        and dataflow."""
        start = time.perf_counter()
        placement = solve_placement(self.problem(trace), solver, options)
        return Decision(placement.phy2log, solver, time.perf_counter() - start)

    def solve_steps(self, steps: np.ndarray, solver: str, options: Mapping[str, Any]) -> Decision:
        """`solver` on stream steps `steps` [n]: from their expert loads for LOAD_SOLVERS, else their tokens."""
        stream = self.step_times.stream
        if solver not in LOAD_SOLVERS:
            return self.solve(stream.tokens_of(steps), solver, options)
        start = time.perf_counter()
        problem = self.problem(stream.tokens_of(steps[-1:]))  # one step's tokens: the model's metadata
        object.__setattr__(problem, "load", stream.loads[steps].sum(0, dtype=np.int64).astype(float))  # [L, E]
        placement = solve_placement(problem, solver, options)
        return Decision(placement.phy2log, solver, time.perf_counter() - start)

    def migration_of(self, old: np.ndarray, new: np.ndarray) -> Migration:
        return plan_migration(old, new, self.topology.num_gpus, self.step_times.cost, self.bytes_per_expert)


class Served:
    """The steps served so far (0 .. upto-1): the only routing a (non-oracle) policy can read."""

    def __init__(self, stream: Stream, upto: int) -> None:
        self._stream, self.upto = stream, int(upto)

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
        return self._stream.loads[self._check(steps)].astype(float)

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
    name: str = "periodic"

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        if step % self.interval_steps:
            return None
        return served.solve(ctx, served.window(self.window_steps), self.solver, self.options)


def imbalance(phy2log: np.ndarray, load: np.ndarray, num_gpus: int) -> float:
    """max / mean tokens per GPU, mean over layers. phy2log [L, P], load [L, E]"""
    return float(gpu_imbalance(gpu_loads(phy2log, load, num_gpus)).mean())


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


@dataclass
class Oracle(Static):
    """Reads the stream's segments (future steps included): a hindsight reference, neither a competitor
    nor a bound (a placement solved on a whole segment need not be the best for each of its steps)."""

    stream: Stream | None = None
    name: str = "oracle"

    def _segment_decision(self, ctx: Context, index: int) -> Decision:
        decision = ctx.solve_steps(self.stream.segment_steps(index), self.solver, self.options)
        return Decision(decision.phy2log, decision.solver, decision.solve_seconds, free=True)

    def initial(self, ctx: Context, profile: Trace) -> Decision:
        return self._segment_decision(ctx, 0)

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        if step not in self.stream.boundaries():
            return None
        return self._segment_decision(ctx, self.stream.boundaries().index(step) + 1)


# ---------------------------------------------------------------- migration_aware
