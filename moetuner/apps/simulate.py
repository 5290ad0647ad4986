"""moetuner-simulate: predicted per-step layer times of a placement on (held-out) routing.

    moetuner-simulate placement=results/eplb.json trace=traces/intent.heldout.safetensors \
        topology=h200_2x8 out=sim/eplb dataflow=dispatch_combine step_tokens=1024 \
        dispatch=null dispatches=[dynamic,static,lp,lp_comm] \
        dispatch_charge=budget dispatch_budget_us=100 bootstrap_resamples=1000 bound=false
writes out/metrics.json (top level: the placement's own dispatch, or `dispatch`, and the setting scored:
topology, num_gpus, step_tokens, dataflow, phase; `by_dispatch`: every
one of `dispatches`; lp and lp_comm charged for their per-batch decision; speedup_ci95 from a paired
bootstrap over the steps; with bound=true the fixed-placement lower bound `bound_step_s` and each
dispatch's `gap_to_bound`), out/per_layer.csv, out/gpu_load_boxplot.png, out/a2a_tail_per_layer.png.
With `phase=prefill|decode` the phase fixes step_tokens and dataflow and scores its own steps of the trace
(moetuner/phase.py: whole sequences at prefill, seeded draws across sequences at decode).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import atomic_path, write_json_atomic
from moetuner.costmodel.charges import DispatchCharge
from moetuner.costmodel.cost import SimulationError
from moetuner.costmodel.evaluate import check_dispatches, check_inputs, own_dispatch, run_simulation
from moetuner.costmodel.placement_bound import check_bound_dataflow
from moetuner.costmodel.simulator import SimResult
from moetuner.phase import phase_from_config, phase_trace, step_settings
from moetuner.placement import load_placement
from moetuner.plotting import plt, save_figure
from moetuner.topology import topology_from_config
from moetuner.trace import load_trace
from moetuner.tracking import AppResult, AppRun, tracked_app


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
        ax.plot((res.scatter_s + res.combine_s).mean(0) * 1e6, marker="o", ms=3, label=name)
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


def interval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """speedup_ci95 [low, high] as the scalars speedup_ci_low, speedup_ci_high (for MLflow)."""
    low, high = metrics["speedup_ci95"]
    return {"speedup_ci_low": low, "speedup_ci_high": high}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="simulate")
@tracked_app("simulate")
def main(cfg: DictConfig) -> AppRun:
    placement, trace = load_placement(cfg.placement), load_trace(cfg.trace)
    topology = topology_from_config(cfg.topology)
    check_inputs(placement, trace, topology)  # bad input fails before a run is opened
    phase = phase_from_config(cfg.get("phase"))
    step_tokens, dataflow = step_settings(phase, topology, int(cfg.step_tokens), str(cfg.dataflow))
    if phase is not None:
        trace = phase_trace(trace, phase, topology)
    dispatch = own_dispatch(placement, cfg.dispatch)
    dispatches = [str(d) for d in cfg.dispatches or []]
    check_dispatches(dispatches)
    charge = DispatchCharge(str(cfg.dispatch_charge), float(cfg.dispatch_budget_us))
    charge.check()
    if cfg.bound:
        check_bound_dataflow(dataflow)
    if int(cfg.bootstrap_resamples) < 200:
        raise SimulationError(f"bootstrap_resamples={cfg.bootstrap_resamples}; give at least 200 resamples")
    tags = {"model": trace.model, "dataset": trace.extra.get("dataset", trace.source), "solver": placement.solver,
            "topology": topology.name, "dataflow": dataflow, "dispatch": dispatch,
            "phase": "none" if phase is None else phase.name}

    def work() -> AppResult:
        result, base, metrics = run_simulation(placement, trace, topology, step_tokens, dataflow,
                                               dispatch, dispatches, charge, int(cfg.bootstrap_resamples),
                                               int(cfg.bootstrap_seed), bool(cfg.bound))
        metrics.update(topology=topology.name, num_gpus=topology.num_gpus, step_tokens=step_tokens, dataflow=dataflow,
                       phase=None if phase is None else phase.name)  # the setting scored (a phase's is derived)
        paths = write_outputs(result, base, metrics, trace.moe_layers, cfg.out)
        by_dispatch = {f"{name}.{key}": value for name, scalars in metrics["by_dispatch"].items()
                       for key, value in {**scalars, **interval_scalars(scalars)}.items()}
        return AppResult({**metrics, **by_dispatch, **interval_scalars(metrics)}, paths, headline="layer_time_s")

    return AppRun(tags, work)
