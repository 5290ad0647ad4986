"""The regime curve: speedup vs contiguous of each placement against tokens per step (costmodel.score, charged).

Expert GEMMs are memory-bound at decode-sized steps (a slot costs its weight read, whatever its token
count), so placement changes little there; at prefill-sized steps compute and all-to-all grow with the
tokens and a balanced placement pays off. `regime_table` scores each placement at each step size on
the same evaluation tokens (the held-out split): a step larger than those tokens is built by repeating
them in order (token i of the step is evaluation token i mod T), which keeps the routing distribution
and per-token expert choices of the evaluation split (each token just appears ceil(S/T) times).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from moetuner.costmodel.charges import DispatchCharge
from moetuner.costmodel.cost import CostModel
from moetuner.costmodel.evaluate import own_dispatch
from moetuner.costmodel.score import score
from moetuner.placement import contiguous_phy2log, expert_location, load_placement
from moetuner.plotting import plt, save_figure
from moetuner.report.collect import parse_run_dir

REGIME_COLUMNS = ["topology", "label", "solver", "replicas", "step_tokens", "num_steps", "tiled",
                  "layer_time_s", "contiguous_layer_time_s", "speedup_vs_contiguous"]


def tile_tokens(ids: np.ndarray, weights: np.ndarray | None, step_tokens: int
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens holding at least one step: the trace itself if it has >= step_tokens tokens, else its tokens
    repeated in order up to exactly one step. ids [T, L, k], weights [T, L, k] or None -> [max(T, S), L, k] each"""
    num_tokens = ids.shape[0]
    if num_tokens == 0:
        raise ValueError("the evaluation trace has no tokens; score on a non-empty held-out split")
    if num_tokens >= step_tokens:
        return ids, weights
    index = np.arange(step_tokens) % num_tokens
    return ids[index], None if weights is None else weights[index]


def regime_table(placements: Mapping[tuple[str, int], np.ndarray], topology: str, cost: CostModel, ids: np.ndarray,
                 weights: np.ndarray | None, num_experts: int, step_tokens: Sequence[int], dataflow: str,
                 dispatch: Mapping[tuple[str, int], str] | None = None, charge: DispatchCharge = DispatchCharge()
                 ) -> pd.DataFrame:
    """REGIME_COLUMNS rows: every placement ((solver, replicas) -> phy2log [L, P]) of one topology at every
    step size, with speedup = layer time of the contiguous layout (ceil(E/G) slots per GPU, as in
    moetuner-simulate) / the placement's, both charged as moetuner-simulate charges them (`charge`: lp and
    lp_comm pay their per-batch decision). `dispatch[key]` is that placement's dispatch (default dynamic;
    the contiguous layout has no replicas: dynamic). ids [T, L, k], gate weights [T, L, k] or None"""
    num_gpus, num_layers = cost.num_gpus, ids.shape[1]
    baseline = contiguous_phy2log(num_layers, num_experts, num_gpus, math.ceil(num_experts / num_gpus))
    rows = []
    for step in sorted(int(s) for s in step_tokens):
        tokens, gates = tile_tokens(ids, weights, step)

        def run(phy2log: np.ndarray, how: str) -> dict[str, float]:
            return score(expert_location(phy2log, num_gpus, num_experts), tokens, gates, cost, step, dataflow, how,
                         charge).metrics()

        base = run(baseline, "dynamic")
        for key, phy2log in sorted(placements.items()):
            metrics = run(phy2log, dispatch.get(key, "dynamic") if dispatch else "dynamic")
            rows.append({"topology": topology, "label": f"{key[0]}-r{key[1]}", "solver": key[0],
                         "replicas": key[1], "step_tokens": step, "num_steps": metrics["num_steps"],
                         "tiled": tokens.shape[0] > ids.shape[0], "layer_time_s": metrics["layer_time_s"],
                         "contiguous_layer_time_s": base["layer_time_s"],
                         "speedup_vs_contiguous": base["layer_time_s"] / metrics["layer_time_s"]})
    return pd.DataFrame(rows, columns=REGIME_COLUMNS)


def regime_figure(table: pd.DataFrame, path: str | os.PathLike[str], title: str = "") -> Path:
    """One panel per topology: speedup vs contiguous against tokens per step (log2 axis), a line per
    placement (dashed: with replicas); dotted: contiguous (1.0)."""
    topologies = list(dict.fromkeys(table["topology"]))
    fig, axes = plt.subplots(1, max(1, len(topologies)), figsize=(5.5 * max(1, len(topologies)), 4), squeeze=False,
                             sharey=True)
    labels = sorted(table.loc[table["solver"] != "contiguous", "label"].unique())  # contiguous is the 1.0 line
    for ax, topology in zip(axes[0], topologies):
        rows = table[table["topology"] == topology]
        for i, label in enumerate(labels):
            line = rows[rows["label"] == label].sort_values("step_tokens")
            if not line.empty:
                ax.plot(line["step_tokens"], line["speedup_vs_contiguous"], marker="o", color=f"C{i}",
                        ls="-" if line["replicas"].iloc[0] == 0 else "--", label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        tiled = rows.loc[rows["tiled"].astype(bool), "step_tokens"]
        if not tiled.empty:  # steps built by repeating the evaluation tokens
            ax.axvspan(tiled.min() / 1.2, tiled.max() * 1.2, color="0.92", zorder=0, label="held-out tokens repeated")
        steps = sorted(rows["step_tokens"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set(title=topology, xlabel="tokens per step")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("speedup vs contiguous")
    if table.empty:
        axes[0, 0].text(0.5, 0.5, "no data: no placements on the regime topologies", ha="center", va="center",
                        transform=axes[0, 0].transAxes)
    fig.suptitle(title or "where placement matters: decode-sized to prefill-sized steps")
    return save_figure(fig, path)


def placements_by_topology(paths: list[str], dispatch: str | None
                           ) -> dict[str, dict[tuple[str, int], tuple[np.ndarray, str]]]:
    """topology -> (solver, replicas) -> (phy2log [L, P], dispatch), from .../<topology>/<solver>-r<R>.json;
    dispatch as moetuner-simulate picks it (`dispatch`, else the placement's own, else dynamic)."""
    out: dict[str, dict[tuple[str, int], tuple[np.ndarray, str]]] = {}
    for path in map(Path, paths):
        placement = load_placement(path)
        out.setdefault(path.parent.name, {})[parse_run_dir(path.stem)] = (placement.phy2log,
                                                                          own_dispatch(placement, dispatch))
    return out
