"""A placement scored on routing it was not computed from, against the contiguous layout, under each dispatch.

The function behind `moetuner-simulate`, `moetuner-regime` and the benchmarks: the same checks, the same
contiguous baseline (Megatron's layout, ceil(E/G) slots per GPU, no replicas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from moetuner.costmodel.charges import DispatchCharge
from moetuner.costmodel.cost import SimulationError, cost_model
from moetuner.costmodel.intervals import RESAMPLES, SEED, speedup_interval
from moetuner.costmodel.score import Scored, score
from moetuner.costmodel.settings import check_dispatch
from moetuner.costmodel.simulator import SimResult
from moetuner.placement import Placement, check_placement, contiguous_phy2log, expert_location, routed_experts
from moetuner.topology import Topology
from moetuner.trace import Trace


def check_inputs(placement: Placement, trace: Trace, topology: Topology) -> None:
    """Raise PlacementError (or TopologyError) when placement, trace and topology disagree."""
    topology.check_fits(trace.num_experts)
    check_placement(placement, topology.num_gpus, trace.num_experts, trace.num_layers, topology.gpus_per_node,
                    routed=routed_experts(trace.topk_ids, trace.num_experts), topology=f"topology {topology.name}")


def own_dispatch(placement: Placement, dispatch: str | None) -> str:
    """`dispatch`, else the one the placement was solved for (extra['dispatch']), else dynamic."""
    return check_dispatch(dispatch or placement.extra.get("dispatch") or "dynamic", SimulationError)


def check_dispatches(dispatches: Sequence[str]) -> None:
    """Raise SimulationError unless every name is one of DISPATCHES."""
    for name in dispatches:
        check_dispatch(name, SimulationError, "dispatches")


def run_simulation(placement: Placement, trace: Trace, topology: Topology, step_tokens: int,
                   dataflow: str, dispatch: str | None = None, dispatches: Sequence[str] = (),
                   charge: DispatchCharge = DispatchCharge(), resamples: int = RESAMPLES, seed: int = SEED
                   ) -> tuple[SimResult, SimResult, dict[str, Any]]:
    """(result, contiguous result, metrics) of `placement` on `trace` under `dispatch`
    (None: the placement's own, see own_dispatch).

    metrics: the scalars of `dispatch` plus `dispatch` and `by_dispatch` {name: scalars} for it and
    every name in `dispatches`. Per dispatch: the charged times (charges.py: `lp` and `lp_comm` pay
    `decision_time_s` per step; `layer_time_free_s` without it), the speedup vs contiguous, its paired
    bootstrap interval over the steps `speedup_ci95` [low, high] (intervals.py; `resamples`, `seed`),
    and `step_times_s` [S] (charged seconds per step, for paired comparisons between placements).
    The contiguous baseline is Megatron's layout with ceil(E/G) slots per GPU and no replicas (so
    every dispatch routes it alike, and none is charged).
    """
    check_inputs(placement, trace, topology)
    dispatch = own_dispatch(placement, dispatch)
    check_dispatches(dispatches)
    charge.check()
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    run = lambda phy, d: score(expert_location(phy, topology.num_gpus, trace.num_experts),  # noqa: E731
                               trace.topk_ids, trace.topk_weights, cost, step_tokens, dataflow, d, charge,
                               progress=True)
    base = run(contiguous_phy2log(trace.num_layers, trace.num_experts, topology.num_gpus,
                                  math.ceil(trace.num_experts / topology.num_gpus)), "dynamic").result
    base_steps = base.layer_time_s.sum(1)  # [S] dynamic: never charged
    base_time = base.metrics()["layer_time_s"]
    replicated = (placement.replica_counts(trace.num_experts) > 1).any()
    results: dict[str, Scored] = {}
    for name in dict.fromkeys([dispatch, *dispatches]):  # without replicas every dispatch routes alike, uncharged
        results[name] = run(placement.phy2log, name) if replicated or not results else next(iter(results.values()))
    by_dispatch = {}
    for name, scored in results.items():
        scalars: dict[str, Any] = scored.metrics()
        steps = scored.step_s
        scalars["contiguous_layer_time_s"] = base_time
        scalars["speedup_vs_contiguous"] = base_time / scalars["layer_time_s"]
        scalars["speedup_ci95"] = list(speedup_interval(base_steps, steps, resamples, seed))
        scalars["step_times_s"] = steps.tolist()
        by_dispatch[name] = scalars
    metrics: dict[str, Any] = {**by_dispatch[dispatch], "dispatch": dispatch, "by_dispatch": by_dispatch,
                               "contiguous_step_times_s": base_steps.tolist(), "dispatch_charge": charge.kind,
                               "dispatch_budget_us": charge.budget_us, "bootstrap_resamples": resamples}
    return results[dispatch].result, base, metrics
