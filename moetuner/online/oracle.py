"""The hindsight oracle (`policy=oracle`): the best placement per segment, in hindsight, migrations charged.

It reads the whole stream, future steps included: a reference to measure policies against, not a policy.
Candidates for segment k:
- each of `solvers` solved once on the profile (the static baselines: the oracle can keep any of them
  throughout, so it is never slower than any static placement, on the stream or on a one-segment stream);
- each of `solvers` solved on segment k's own steps;
- `migration_aware`'s candidates (`MigrationAware.candidates`) built on segment k's steps from the
  placement the programme below holds at the end of segment k - 1 (for k = 0 the best static), and that
  placement itself (kept).
A dynamic programme over segments picks one candidate per segment to minimise the stream's total time:
each segment's simulated serve time plus, where the placement changes at a segment's first step, its
migration (the stop-the-world transfer rounds + `migration.overhead_s`). The replay charges exactly this
in `stop_the_world` mode (`predicted_s` equals the replay's total), and the overlapped transfers in
`overlapped` mode. Decisions are free (no decision time) and take effect at the segment's first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moetuner.online.migration_aware import MigrationAware
from moetuner.online.policies import Context, Decision, Served
from moetuner.online.steptimes import placement_id
from moetuner.online.stream import Stream
from moetuner.trace import Trace

Candidate = tuple[str, np.ndarray]  # (label, phy2log [L, P])


def unique(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates with each placement once (the first label kept)."""
    seen: dict[str, Candidate] = {}
    for label, phy2log in candidates:
        seen.setdefault(placement_id(phy2log), (label, phy2log))
    return list(seen.values())


@dataclass
class Oracle:
    """The best placement per segment in hindsight (module doc); `solved` keeps the solvers' placements
    across replays of one stream and setting (e.g. at several `migration.overhead_s`)."""

    solvers: tuple[str, ...]
    options: Mapping[str, Mapping[str, Any]]  # per solver
    stream: Stream
    proposer: MigrationAware = field(default_factory=lambda: MigrationAware("eplb", {}))
    name: str = "oracle"
    solved: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict)
    plan: list[Candidate] = field(default_factory=list)
    predicted_s: float = 0.0  # the programme's total: the replay's total_time_s in stop_the_world mode

    def _solved(self, ctx: Context, solver: str, segment: int, profile: Trace) -> np.ndarray:
        """`solver` on the profile (segment -1) or on segment `segment`'s steps, solved once. [L, P]"""
        key = self._key(ctx, solver, segment)
        if key not in self.solved:
            options = dict(self.options.get(solver) or {})
            decision = (ctx.solve(profile, solver, options) if segment < 0 else
                        ctx.solve_steps(self.stream.segment_steps(segment), solver, options))
            self.solved[key] = decision.phy2log
        return self.solved[key]

    def adopt_static(self, ctx: Context, solver: str, phy2log: np.ndarray) -> None:
        """Use `phy2log` [L, P] as `solver`'s profile placement (a static baseline solved elsewhere), so that
        the oracle's static candidates are exactly the baselines it is compared with."""
        self.solved[self._key(ctx, solver, -1)] = phy2log

    def _key(self, ctx: Context, solver: str, segment: int) -> tuple[Any, ...]:
        return ctx.topology.name, ctx.replicas, ctx.step_times.dispatch, ctx.step_times.dataflow, solver, segment

    def switch_s(self, ctx: Context, old: np.ndarray, new: np.ndarray) -> float:
        """What changing placement costs at a segment's first step (0 when it stays)."""
        if np.array_equal(old, new):
            return 0.0
        return ctx.migration_of(old, new).duration_s() + ctx.migration.overhead_s

    def plan_segments(self, ctx: Context, profile: Trace) -> tuple[list[Candidate], float]:
        """(the chosen candidate of every segment, the stream's predicted total seconds)."""
        statics = [(f"{s} on the profile", self._solved(ctx, s, -1, profile)) for s in self.solvers]
        served = Served(self.stream, self.stream.num_steps)  # hindsight: every step
        states: list[tuple[float, list[Candidate]]] = []  # per candidate of the last segment: (total, path)
        for k in range(len(self.stream.segments)):
            steps = self.stream.segment_steps(k)
            seconds = lambda c: float(ctx.step_times.times(c[1], steps).step_s.sum())  # noqa: E731
            if states:
                base = min(states, key=lambda s: s[0])[1][-1]
            else:
                base = min(statics, key=seconds)
            proposed = self.proposer.candidates(ctx, served, steps, base[1])
            candidates = unique([*statics, *[(f"{s} on segment {k}", self._solved(ctx, s, k, profile))
                                             for s in self.solvers],
                                 *[(f"migration_aware {name} on segment {k}", v) for name, v in proposed.items()],
                                 (f"kept ({base[0]})", base[1])])
            if not states:
                states = [(seconds(c), [c]) for c in candidates]
                continue
            new_states = []
            for c in candidates:
                total, path = min(((t + self.switch_s(ctx, p[-1][1], c[1]), p) for t, p in states),
                                  key=lambda s: s[0])
                new_states.append((total + seconds(c), [*path, c]))
            states = new_states
        total, path = min(states, key=lambda s: s[0])
        return path, total

    def initial(self, ctx: Context, profile: Trace) -> Decision:
        self.plan, self.predicted_s = self.plan_segments(ctx, profile)
        return self._decision(0)

    def _decision(self, segment: int) -> Decision:
        label, phy2log = self.plan[segment]
        return Decision(phy2log, f"oracle: {label}", 0.0, free=True, extra={"oracle_predicted_s": self.predicted_s})

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        boundaries = self.stream.boundaries()
        return self._decision(boundaries.index(step) + 1) if step in boundaries else None
