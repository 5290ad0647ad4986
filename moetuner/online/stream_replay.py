"""The replay loop: serve a stream step by step under a policy, migrations included; write the outputs."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moetuner.atomic import atomic_path, write_json_atomic
from moetuner.online.decision_time import DecisionCost, work_between
from moetuner.online.migration import (NO_MIGRATION, Migration, MigrationConfig, expert_bytes, overlap_s,
                                       slots_changed, slowed_step_s, wait_s)
from moetuner.online.policies import Context, Decision, Policy, Served, imbalance
from moetuner.online.steptimes import StepTimes
from moetuner.online.stream import Stream
from moetuner.placement import Placement, check_placement, contiguous_phy2log, save_placement
from moetuner.solvers.problem import PlacementProblem
from moetuner.costmodel.cost import SimulationError, cost_model
from moetuner.costmodel.settings import Dataflow, Dispatch, check_dataflow, check_dispatch
from moetuner.topology import Topology
from moetuner.trace import Trace, save_trace

TIMELINE_COLUMNS = ("step", "segment", "trace", "step_time_s", "placement_version", "wait_s",
                    "contiguous_step_time_s", "peak_to_average")


@dataclass
class Version:
    """A placement used during the replay, from `effective_step` on."""

    phy2log: np.ndarray  # [L, P]
    solver: str
    solve_seconds: float
    decided_step: int  # the step before which the policy was asked (it read steps before this one)
    effective_step: int  # the first step served with it
    migration: Migration = NO_MIGRATION
    wait_s: float = 0.0  # serving waited this long (stop_the_world transfers, and migration.overhead_s)
    delay_steps: int = 0  # steps served while the decision was computed (its charged time)
    decision_seconds: float = 0.0  # the decision's time as charged: its counted work x ctx.decision_cost
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplayResult:
    rows: list[dict[str, Any]]  # one per step, TIMELINE_COLUMNS
    versions: list[Version]
    metrics: dict[str, float]


def _version(decision: Decision, decided: int, effective: int, migration: Migration, wait: float,
             delay: int = 0, seconds: float = 0.0) -> Version:
    """A placement as it is adopted (checked by `version_placement` when written)."""
    return Version(decision.phy2log, decision.solver, decision.solve_seconds, decided, effective, migration, wait,
                   delay, seconds, dict(decision.extra))


@dataclass
class Thinking:
    """A decision being computed beside serving: it takes effect once serving has spent `left_s` more."""

    decision: Decision | None  # None: the policy kept the placement (the controller was busy all the same)
    decided_step: int
    seconds: float
    left_s: float


def replay_stream(stream: Stream, profile: Trace, policy: Policy, ctx: Context) -> ReplayResult:
    """Serve every step of `stream`. The policy is asked before a step while it is idle (not while a
    decision of its own is being computed nor while a migration runs); a decision that read steps up to
    t - 1 and was charged w seconds (its counted work priced by ctx.decision_cost: the same on any machine)
    takes effect before the first step t + d whose predecessors t .. t + d - 1 lasted w in all
    (d = ceil(w / step time) at a constant step time), then migrates. The oracle's free decisions take effect at once (their migrations are charged as any other).
    Every redeployment also stops serving for `migration.overhead_s`."""
    started = time.perf_counter()
    times, config = ctx.step_times, ctx.migration
    segment_of = stream.segment_of_step()
    first = stream.first
    contiguous = contiguous_phy2log(first.num_layers, first.num_experts, ctx.topology.num_gpus,
                                    math.ceil(first.num_experts / ctx.topology.num_gpus))
    contiguous_s = times.times(contiguous, np.arange(stream.num_steps)).step_s  # [S], cached for every replay
    init = policy.initial(ctx, profile)
    versions = [_version(init, 0, 0, NO_MIGRATION, 0.0)]
    version_placement(versions[0], 0, ctx, first)  # raises PlacementError if it does not fit
    current = init.phy2log
    pending: tuple[Version, float] | None = None  # an overlapped migration and its seconds left
    thinking: Thinking | None = None
    rows = []
    for step in range(stream.num_steps):
        wait = 0.0
        for ask in (False, True):  # a finished decision takes effect first; then an idle policy is asked
            if ask and step > 0 and pending is None and thinking is None:
                before = ctx.work_done()
                decision = policy.decide(ctx, step, Served(stream, step, ctx.work), current)
                seconds = (0.0 if decision is not None and decision.free else
                           ctx.decision_cost.seconds(work_between(before, ctx.work_done())))
                if decision is not None and np.array_equal(decision.phy2log, current):
                    decision = None
                if decision is not None:
                    version_placement(_version(decision, step, step, NO_MIGRATION, 0.0), len(versions), ctx, first)
                thinking = Thinking(decision, step, seconds, seconds)
            if thinking is None or thinking.left_s > 0:
                continue
            decision, decided, seconds = thinking.decision, thinking.decided_step, thinking.seconds
            thinking = None
            if decision is None:
                continue
            migration = ctx.migration_of(current, decision.phy2log)
            adopted = _version(decision, decided, step, migration, 0.0, step - decided, seconds)
            if config.mode == "overlapped" and migration.experts_moved:
                pending = (adopted, overlap_s(migration, config))
            else:
                adopted.wait_s = wait_s(migration, config)
                wait += adopted.wait_s
                versions.append(adopted)
                current = decision.phy2log
        a2a_s, plain_s = times.step(current, step)
        in_effect = len(versions) - 1  # the placement this step is served with
        if pending is not None:
            step_s = slowed_step_s(a2a_s, plain_s - a2a_s, config)
            adopted, left = pending
            pending = (adopted, left - step_s)
            if left - step_s <= 0 and step + 1 < stream.num_steps:
                adopted.effective_step = step + 1
                adopted.wait_s = wait_s(adopted.migration, config)  # the overhead, before step + 1
                wait += adopted.wait_s
                versions.append(adopted)
                current, pending = adopted.phy2log, None
        else:
            step_s = plain_s
        if thinking is not None:
            thinking.left_s -= step_s
        seg = stream.segments[segment_of[step]]
        rows.append({"step": step, "segment": int(segment_of[step]), "trace": seg.label, "step_time_s": step_s,
                     "placement_version": in_effect, "wait_s": wait,
                     "contiguous_step_time_s": float(contiguous_s[step])})
    for row, peak in zip(rows, peak_to_average(stream, versions, [r["placement_version"] for r in rows], ctx)):
        row["peak_to_average"] = float(peak)
    return ReplayResult(rows, versions, replay_metrics(rows, versions, time.perf_counter() - started,
                                                       times.simulated))


def peak_to_average(stream: Stream, versions: list[Version], in_effect: list[int], ctx: Context,
                    chunk: int = 512) -> np.ndarray:
    """Each step's peak-to-average GPU load under the placement it was served with (`in_effect`, a version
    index per step), `chunk` steps of one placement at a time. -> [S]"""
    in_effect = np.asarray(in_effect)
    out = np.empty(len(in_effect))
    for k, version in enumerate(versions):
        steps = np.flatnonzero(in_effect == k)
        for i in range(0, len(steps), chunk):
            part = steps[i:i + chunk]
            out[part] = imbalance(version.phy2log, stream.loads[part], ctx.topology.num_gpus)
    return out


def replay_metrics(rows: list[dict[str, Any]], versions: list[Version], wall_s: float,
                   simulated: int) -> dict[str, float]:
    """metrics.json: totals, migrations (bytes, share of the total, slots changed per redeployment), peak-to-average
    GPU load, speedup vs contiguous, solve and decision time per rebalance."""
    serve = float(sum(r["step_time_s"] for r in rows))
    waited = float(sum(r["wait_s"] for r in rows))
    contiguous = float(sum(r["contiguous_step_time_s"] for r in rows))
    moved = versions[1:]
    solves = [v.solve_seconds for v in moved]
    delays = [v.delay_steps for v in moved]
    return {
        "total_time_s": serve + waited,
        "serve_time_s": serve,
        "migration_time_s": waited,
        "rebalances": len(moved),
        "experts_moved": int(sum(v.migration.experts_moved for v in moved)),
        "bytes_moved": float(sum(v.migration.bytes_moved for v in moved)),
        "migration_share": waited / (serve + waited),
        "slots_changed_per_rebalance": (float(np.mean([slots_changed(a.phy2log, b.phy2log)
                                                       for a, b in zip(versions, moved)])) if moved else 0.0),
        "peak_to_average_load": float(np.mean([r["peak_to_average"] for r in rows])),
        "steps": len(rows),
        "contiguous_time_s": contiguous,
        "speedup_vs_contiguous": contiguous / (serve + waited),
        "initial_solve_seconds": versions[0].solve_seconds,
        "solve_seconds_per_rebalance": float(np.mean(solves)) if solves else 0.0,
        "solve_seconds_max": float(max(solves, default=0.0)),
        "decision_seconds_per_rebalance": float(np.mean([v.decision_seconds for v in moved])) if moved else 0.0,
        "decision_delay_steps": float(np.mean(delays)) if delays else 0.0,
        "decision_delay_steps_max": float(max(delays, default=0)),
        "replay_wall_s": wall_s,
        "steps_simulated": simulated,
    }


def version_placement(version: Version, index: int, ctx: Context, trace: Trace) -> Placement:
    """A used placement in moetuner-solve's format, with when it took effect and what moving to it cost."""
    extra = {"num_experts": trace.num_experts, "replicas": ctx.replicas, "topology": ctx.topology.name,
             "model": trace.model, "version": index, "effective_step": version.effective_step,
             "decided_step": version.decided_step, "decision_delay_steps": version.delay_steps,
             "decision_seconds": version.decision_seconds, "experts_moved": version.migration.experts_moved,
             "bytes_moved": version.migration.bytes_moved, "migration_rounds": version.migration.rounds,
             "migration_wait_s": version.wait_s, **version.extra}
    placement = Placement(version.phy2log, ctx.topology.num_gpus, ctx.topology.nodes, version.solver,
                          solve_seconds=version.solve_seconds, extra=extra)
    check_placement(placement, ctx.topology.num_gpus, trace.num_experts, trace.num_layers,
                    ctx.topology.gpus_per_node, topology=ctx.topology.name)
    return placement


def write_timeline(rows: list[dict[str, Any]], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMELINE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def speedup_figure(rows: list[dict[str, Any]], versions: list[Version], boundaries: list[int], title: str,
                   path: Path) -> Path:
    """Per-step speedup vs contiguous over time; segment boundaries (grey) and rebalances (red) marked."""
    from moetuner.plotting import plt, save_figure

    step = np.array([r["step"] for r in rows])
    speedup = np.array([r["contiguous_step_time_s"] / r["step_time_s"] for r in rows])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(step, speedup, lw=1, color="tab:blue", label="speedup vs contiguous")
    for i, b in enumerate(boundaries):
        ax.axvline(b - 0.5, color="grey", ls="--", lw=1, label="segment boundary" if i == 0 else None)
    for i, v in enumerate(versions[1:]):
        ax.axvline(v.effective_step - 0.5, color="tab:red", lw=0.8, alpha=0.7, label="rebalance" if i == 0 else None)
    waits = [r["step"] for r in rows if r["wait_s"] > 0]
    if waits:
        ax.scatter(waits, np.ones(len(waits)) * speedup.min(), marker="v", color="tab:red", s=12,
                   label="serving waited")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set(xlabel="step", ylabel="speedup vs contiguous", title=title)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def steps_trace(stream: Stream) -> Trace:
    """The stream's steps in order as one trace in the project's format: token j of step s is token
    s * step_tokens + j, so `moetuner-simulate ... step_tokens=<step_tokens>` scores the served steps."""
    trace = stream.tokens_of(np.arange(stream.num_steps))
    return replace(trace, extra={**trace.extra, "step_tokens": str(stream.step_tokens),
                                 "stream_steps": str(stream.num_steps)})


def write_outputs(result: ReplayResult, stream: Stream, ctx: Context, title: str, out: str | Path,
                  save_steps: bool = False) -> list[Path]:
    """metrics.json, timeline.csv, placements/v<k>.json and speedup_timeline.png in folder `out`; with
    `save_steps` also steps.safetensors (steps_trace)."""
    out = Path(out)
    paths = [write_json_atomic(out / "metrics.json", result.metrics),
             write_timeline(result.rows, out / "timeline.csv")]
    for k, version in enumerate(result.versions):
        placement = version_placement(version, k, ctx, stream.first)
        paths.append(save_placement(placement, out / "placements" / f"v{k}.json"))
    paths.append(speedup_figure(result.rows, result.versions, stream.boundaries(), title,
                                out / "speedup_timeline.png"))
    if save_steps:
        paths.append(save_trace(steps_trace(stream), out / "steps.safetensors"))
    return paths


def make_context(stream: Stream, topology: Topology, replicas: int, dataflow: Dataflow, dispatch: Dispatch,
                 migration: MigrationConfig, decision_cost: DecisionCost) -> Context:
    """The policies' context; checks dataflow, dispatch and the replica budget by simulating one step."""
    first = stream.first
    PlacementProblem(first, topology, replicas=replicas, step_tokens=stream.step_tokens)  # raises if it cannot fit
    cost = cost_model(topology, first.hidden_size, first.moe_intermediate_size)
    check_dataflow(dataflow, SimulationError)
    check_dispatch(dispatch, SimulationError)
    times = StepTimes(stream, cost, topology.num_gpus, first.num_experts, dataflow, dispatch)
    stream.loads  # the per-step load counters an engine keeps while serving: computed now, not in a decision
    return Context(topology, replicas, times, migration,
                   expert_bytes(first.hidden_size, first.moe_intermediate_size), decision_cost)
