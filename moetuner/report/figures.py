"""The report's figures (PNG): GPU-load heatmaps and box plots, all-to-all tail per layer, predicted vs
measured layer time, solve time vs problem size. Each figure says so when the study has no data for it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from moetuner.placement import gpu_loads, load_placement
from moetuner.profiling.stats import expert_load
from moetuner.plotting import plt, save_figure, spread_layers
from moetuner.report.collect import per_layer, served_prediction
from moetuner.study.targets import placement_path, split_path
from moetuner.trace import load_trace


def relative_load(load: np.ndarray) -> np.ndarray:
    """Each layer's per-GPU load over its mean (1 = perfectly balanced). [L, G] -> [L, G]"""
    return load / np.maximum(load.mean(-1, keepdims=True), 1e-12)


def no_data(path: str | os.PathLike[str], title: str, reason: str) -> Path:
    """A placeholder figure that says why it is empty."""
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{title}\n(no data: {reason})", ha="center", va="center")
    return save_figure(fig, path)


def showcase(table: pd.DataFrame) -> tuple[str, str, pd.Series]:
    """(trace, topology, best row) to draw per-layer figures for: the held-out case with the most GPUs'
    placements, and its fastest non-contiguous placement."""
    held = table[(table["eval"] == "heldout") & (table.solver != "contiguous")]
    assert not held.empty, "no held-out evaluation of a non-contiguous placement"
    sizes = held.groupby(["trace", "topology"]).size().sort_values(ascending=False)
    trace, topology = sizes.index[0]
    case = held[(held.trace == trace) & (held.topology == topology)]
    return trace, topology, case.loc[case["predicted_layer_time_s"].idxmin()]


def showcase_loads(results: Path, trace: str, topology: str, best: pd.Series) -> dict[str, np.ndarray]:
    """Relative per-GPU load [L, G] on the held-out routing: contiguous (before) and the best placement (after)."""
    heldout = load_trace(split_path(str(results), trace, "heldout"))
    loads = {}
    for solver, replicas in (("contiguous", 0), (best.solver, int(best.replicas))):
        placement = load_placement(placement_path(str(results), trace, topology, solver, replicas))
        counts = expert_load(heldout.topk_ids, heldout.num_experts)
        loads[f"{solver}-r{replicas}"] = relative_load(gpu_loads(placement.phy2log, counts, placement.num_gpus))
    return loads


def load_heatmaps(loads: dict[str, np.ndarray], case: str, path: str | os.PathLike[str]) -> Path:
    """Per-layer per-GPU load [L, G] before/after placement, one panel each, one colour scale."""
    fig, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 4.5), squeeze=False, sharey=True)
    vmax = max(float(m.max()) for m in loads.values())
    for ax, (name, load) in zip(axes[0], loads.items()):
        image = ax.imshow(load, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(spread_layers(load.shape[1], 8))
        ax.set_yticks(spread_layers(load.shape[0], 8))
        ax.set(title=f"{name}: mean max/mean {load.max(-1).mean():.2f}", xlabel="GPU")
    axes[0, 0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="GPU tokens / layer mean")
    fig.suptitle(f"{case}: per-GPU load on held-out routing, before and after placement")
    return save_figure(fig, path)


def load_boxplots(loads: dict[str, np.ndarray], case: str, path: str | os.PathLike[str]) -> Path:
    """Per layer, the spread of per-GPU load for each placement (boxes side by side)."""
    num_layers = next(iter(loads.values())).shape[0]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.3 * num_layers * len(loads))), 4))
    width = 0.8 / len(loads)
    for i, (name, load) in enumerate(loads.items()):
        positions = np.arange(num_layers) + (i - (len(loads) - 1) / 2) * width
        box = ax.boxplot(load.T, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{i}")
        ax.plot([], [], color=f"C{i}", lw=6, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(num_layers), [str(l) for l in range(num_layers)], fontsize=7)
    ax.set(xlabel="MoE layer", ylabel="GPU load / layer mean", title=f"{case}: per-GPU token load per layer")
    ax.legend()
    return save_figure(fig, path)


def a2a_tail(results: Path, table: pd.DataFrame, trace: str, topology: str, path: str | os.PathLike[str]) -> Path:
    """Per-layer all-to-all time (scatter + combine, the slowest GPU's) of every held-out run of a case."""
    runs = table[(table.trace == trace) & (table.topology == topology) & (table["eval"] == "heldout")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for _, run in runs.iterrows():
        layers = per_layer(results, trace, topology, run.solver, int(run.replicas))
        ax.plot(layers["layer"], (layers["scatter_s"] + layers["combine_s"]) * 1e6, marker=".",
                label=f"{run.solver}-r{run.replicas}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="MoE layer", ylabel="all-to-all tail (us)", title=f"{trace} on {topology}: all-to-all tail per layer")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def predicted_vs_measured(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Simulator's layer time vs the served one, one point per served placement on shaped links (the
    prediction on exactly the served steps where the serve run recorded it, else the simulate run's)."""
    pairs = table.dropna(subset=["measured_layer_time_s"])
    pairs = pairs[pairs["serve_links_shaped"].fillna(False).astype(bool)] if "serve_links_shaped" in pairs else pairs
    if pairs.empty:
        return no_data(path, "predicted vs measured layer time", "no serve runs on shaped links")
    pairs = pairs.assign(predicted_layer_time_s=served_prediction(pairs))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, (_, row) in enumerate(pairs.iterrows()):
        ax.scatter(row.predicted_layer_time_s * 1e3, row.measured_layer_time_s * 1e3, color=f"C{i}",
                   label=f"{row.trace}/{row.solver}-r{row.replicas}")
    top = 1.1e3 * float(pairs[["predicted_layer_time_s", "measured_layer_time_s"]].to_numpy().max())
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="measured = predicted")
    ax.set(xlim=(0, top), ylim=(0, top))
    rho = pairs["predicted_layer_time_s"].rank().corr(pairs["measured_layer_time_s"].rank())
    ax.set(xlabel="predicted (simulator, ms per step)", ylabel="measured (serve, ms per step)",
           title=f"{pairs.topology.iloc[0]}: predicted vs measured (Spearman {rho:.2f})")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def solve_time(placements: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Solve time against problem size (layers x experts x GPUs), one colour per solver."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (solver, rows) in enumerate(placements.groupby("solver")):
        size = rows.layers * rows.experts * rows.gpus
        ax.scatter(size, np.maximum(rows.solve_seconds, 1e-4), color=f"C{i}", label=solver)
    ax.set(xscale="log", yscale="log", xlabel="problem size: layers x experts x GPUs", ylabel="solve time (s)",
           title="solve time vs problem size")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
