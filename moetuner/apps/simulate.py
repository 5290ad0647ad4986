"""moetuner-simulate: predicted per-step layer times of a placement on (held-out) routing.

    moetuner-simulate placement=results/eplb.json trace=traces/intent.heldout.safetensors \
        topology=h200_2x8 out=sim/eplb dataflow=dispatch_combine step_tokens=1024 \
        dispatch=null dispatches=[dynamic,static,lp,lp_comm]
writes out/metrics.json (top level: the placement's own dispatch, or `dispatch`; `by_dispatch`: every
one of `dispatches`), out/per_layer.csv, out/gpu_load_boxplot.png, out/a2a_tail_per_layer.png.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import atomic_path, write_json_atomic
from moetuner.placement.layout import Placement, check_placement, contiguous_phy2log, load_placement, routed_experts
from moetuner.profiling.figures import plt, save_figure
from moetuner.cost import SimulationError, cost_model
from moetuner.dispatch import DISPATCHES
from moetuner.simulator import SimResult, primary_column, simulate
from moetuner.topology import Topology, topology_from_config
from moetuner.trace import Trace, load_trace
from moetuner.tracking import tracked_run


def check_inputs(placement: Placement, trace: Trace, topology: Topology) -> None:
    """Raise PlacementError (or TopologyError) when placement, trace and topology disagree."""
    topology.check_fits(trace.num_experts)
    check_placement(placement, topology.num_gpus, trace.num_experts, trace.num_layers, topology.gpus_per_node,
                    routed=routed_experts(trace.topk_ids, trace.num_experts), topology=f"topology {topology.name}")


def own_dispatch(placement: Placement, dispatch: str | None) -> str:
    """`dispatch`, else the one the placement was solved for (extra['dispatch']), else dynamic."""
    chosen = dispatch or placement.extra.get("dispatch") or "dynamic"
    if chosen not in DISPATCHES:
        raise SimulationError(f"dispatch={chosen!r} is unknown; choose one of {list(DISPATCHES)}")
    return str(chosen)


def check_dispatches(dispatches: Sequence[str]) -> None:
    """Raise SimulationError unless every name is one of DISPATCHES."""
    unknown = [d for d in dispatches if d not in DISPATCHES]
    if unknown:
        raise SimulationError(f"dispatches={unknown} unknown; choose from {list(DISPATCHES)}")


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


def write_per_layer(result: SimResult, moe_layers: list[int], path: Path) -> Path:
    """The per-layer table (means over steps) as CSV."""
    columns = result.per_layer()
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "moe_layer", *columns])
        for i, layer in enumerate(moe_layers):
            writer.writerow([i, layer, *(f"{col[i]:.6g}" for col in columns.values())])
    return path


def gpu_load_boxplot(result: SimResult, path: Path) -> Path:
    """Box plot per layer of tokens per GPU over all steps and GPUs (relative to the mean)."""
    tokens = result.tokens  # [S, L, G]
    share = tokens / np.maximum(tokens.mean(-1, keepdims=True), 1e-12)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * share.shape[1]), 4))
    ax.boxplot([share[:, layer].ravel() for layer in range(share.shape[1])], showfliers=False)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="MoE layer", ylabel="tokens per GPU / mean", title="per-GPU load per layer (all steps)")
    return save_figure(fig, path)


def a2a_tail_plot(result: SimResult, base: SimResult, path: Path) -> Path:
    """Dispatch + combine tail per layer (mean over steps), this placement vs contiguous."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in (("placement", result), ("contiguous", base)):
        ax.plot((res.dispatch_s + res.combine_s).mean(0) * 1e6, marker="o", ms=3, label=name)
    ax.set(xlabel="MoE layer", ylabel="all-to-all tail (us)", title="dispatch + combine tail per layer")
    ax.legend()
    return save_figure(fig, path)


def write_outputs(result: SimResult, base: SimResult, metrics: dict[str, Any], moe_layers: list[int],
                  out: str | Path) -> list[Path]:
    """metrics.json, per_layer.csv and the two figures in folder `out`."""
    out = Path(out)
    return [write_json_atomic(out / "metrics.json", metrics),
            write_per_layer(result, moe_layers, out / "per_layer.csv"),
            gpu_load_boxplot(result, out / "gpu_load_boxplot.png"),
            a2a_tail_plot(result, base, out / "a2a_tail_per_layer.png")]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="simulate")
def main(cfg: DictConfig) -> None:
    placement, trace = load_placement(cfg.placement), load_trace(cfg.trace)
    topology = topology_from_config(cfg.topology)
    check_inputs(placement, trace, topology)  # bad input fails before a run is opened
    dispatch = own_dispatch(placement, cfg.dispatch)
    dispatches = [str(d) for d in cfg.dispatches or []]
    check_dispatches(dispatches)
    tags = {"model": trace.model, "dataset": trace.extra.get("dataset", trace.source), "solver": placement.solver,
            "topology": topology.name, "dataflow": str(cfg.dataflow), "dispatch": dispatch}
    with tracked_run("simulate", cfg, tags=tags) as run:
        result, base, metrics = run_simulation(placement, trace, topology, int(cfg.step_tokens), str(cfg.dataflow),
                                               dispatch, dispatches)
        paths = write_outputs(result, base, metrics, trace.moe_layers, cfg.out)
        run.log_metrics(metrics)
        run.log_metrics({f"{name}.{key}": value for name, scalars in metrics["by_dispatch"].items()
                         for key, value in scalars.items()})
        for path in paths:
            run.log_artifact(path)
