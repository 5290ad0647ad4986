"""A placement scored on routing it was not computed from, against the contiguous layout, under each dispatch.

The function behind `moetuner-simulate`, `moetuner-regime` and the benchmarks: the same checks, the same
contiguous baseline (Megatron's layout, ceil(E/G) slots per GPU, no replicas).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moetuner.costmodel.cost import SimulationError, cost_model
from moetuner.costmodel.settings import check_dispatch
from moetuner.costmodel.simulator import SimResult, primary_column, simulate
from moetuner.placement import Placement, check_placement, contiguous_phy2log, routed_experts
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
                   dataflow: str, dispatch: str | None = None, dispatches: Sequence[str] = ()
                   ) -> tuple[SimResult, SimResult, dict[str, Any]]:
    """(result, contiguous result, metrics) of `placement` on `trace` under `dispatch`
    (None: the placement's own, see own_dispatch).

    metrics: the scalars of `dispatch` plus `dispatch` and `by_dispatch` {name: scalars} for it and
    every name in `dispatches`. The contiguous baseline is Megatron's layout with ceil(E/G) slots per GPU
    and no replicas (so every dispatch routes it alike).
    """
    check_inputs(placement, trace, topology)
    dispatch = own_dispatch(placement, dispatch)
    check_dispatches(dispatches)
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    ids, primary = trace.topk_ids.astype(np.int64), primary_column(trace.topk_ids, trace.topk_weights)
    run = lambda phy, d: simulate(phy, topology.num_gpus, ids, primary, trace.num_experts, cost,  # noqa: E731
                                  step_tokens, dataflow, d, progress=True)
    base = run(contiguous_phy2log(trace.num_layers, trace.num_experts, topology.num_gpus,
                                  math.ceil(trace.num_experts / topology.num_gpus)), "dynamic")
    base_time = base.metrics()["layer_time_s"]
    replicated = bool((placement.replica_counts(trace.num_experts) > 1).any())
    results: dict[str, SimResult] = {}
    for name in dict.fromkeys([dispatch, *dispatches]):  # without replicas every dispatch routes alike
        results[name] = run(placement.phy2log, name) if replicated or not results else next(iter(results.values()))
    by_dispatch = {}
    for name, res in results.items():
        scalars = res.metrics()
        scalars["contiguous_layer_time_s"] = base_time
        scalars["speedup_vs_contiguous"] = base_time / scalars["layer_time_s"]
        by_dispatch[name] = scalars
    metrics: dict[str, Any] = {**by_dispatch[dispatch], "dispatch": dispatch, "by_dispatch": by_dispatch}
    return results[dispatch], base, metrics
