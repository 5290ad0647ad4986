"""Fit the simulator's cost constants from measured serve runs (least squares on per_layer.csv rows).

Per (step, layer, rank) row:
  compute_s               ~ expert_fixed_s * active_slots + expert_per_token_s * pairs
  dispatch_s + combine_s  ~ comm_fixed_s + bytes_intra / intra_bw + bytes_inter / inter_bw
A predicted MoE-layer time aggregates the fitted row times exactly as `measure.summarize` aggregates
the measured ones (sum over layers per rank, max over ranks, mean over steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

EXCHANGES_PER_LAYER = 2  # dispatch and combine


class CalibrationError(ValueError):
    """The measured runs cannot determine the constants; the message says what to measure."""


@dataclass(frozen=True)
class CostFit:
    expert_fixed_s: float  # per active expert slot per layer
    expert_per_token_s: float  # per (token, expert) pair
    comm_fixed_s: float  # per layer, dispatch + combine
    intra_node_bw: float | None  # B/s; None when the runs had no intra-node traffic to fit it on
    inter_node_bw: float | None  # B/s; None when the runs had no inter-node traffic


def nonneg_lstsq(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with negative coefficients dropped (their feature refitted without them)."""
    keep = np.ones(features.shape[1], dtype=bool)
    while True:
        coef = np.zeros(features.shape[1])
        coef[keep] = np.linalg.lstsq(features[:, keep], target, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        keep &= coef > 0


def fit_costs(per_layer: pd.DataFrame) -> CostFit:
    """Fit the cost constants on the rows of one or more runs' per_layer.csv tables."""
    if len(per_layer) < 4:
        raise CalibrationError(f"{len(per_layer)} per-layer rows cannot fit 5 constants; "
                               f"give runs with more steps or more placements")
    compute = nonneg_lstsq(per_layer[["active_slots", "pairs"]].to_numpy(float),
                            per_layer["compute_s"].to_numpy(float))
    comm_features = per_layer[["bytes_intra", "bytes_inter"]].to_numpy(float)
    comm = nonneg_lstsq(np.column_stack([np.ones(len(per_layer)), comm_features]),
                         (per_layer["dispatch_s"] + per_layer["combine_s"]).to_numpy(float))
    bw = [float(1 / c) if c > 0 and comm_features[:, i].any() else None for i, c in enumerate(comm[1:])]
    return CostFit(expert_fixed_s=float(compute[0]), expert_per_token_s=float(compute[1]),
                   comm_fixed_s=float(comm[0]), intra_node_bw=bw[0], inter_node_bw=bw[1])


def predicted_row_times(per_layer: pd.DataFrame, fit: CostFit) -> pd.Series:
    """Fitted dispatch + compute + combine seconds of every row."""
    comm = fit.comm_fixed_s + sum(per_layer[col] / bw for col, bw in
                                  (("bytes_intra", fit.intra_node_bw), ("bytes_inter", fit.inter_node_bw)) if bw)
    return fit.expert_fixed_s * per_layer["active_slots"] + fit.expert_per_token_s * per_layer["pairs"] + comm


def moe_layer_time(per_layer: pd.DataFrame, row_times: pd.Series) -> float:
    """Per step: summed layer times per rank, max over ranks; mean over steps."""
    return float(row_times.groupby([per_layer["step"], per_layer["rank"]]).sum().groupby(level=0).max().mean())


def compare(runs: dict[str, pd.DataFrame], fit: CostFit) -> tuple[pd.DataFrame, float]:
    """Predicted vs measured MoE-layer time per run, relative error, and Spearman rank correlation."""
    rows = []
    for name, table in runs.items():
        measured = moe_layer_time(table, table["layer_s"])
        predicted = moe_layer_time(table, predicted_row_times(table, fit))
        rows.append({"run": name, "measured_s": measured, "predicted_s": predicted,
                     "rel_error": abs(predicted - measured) / measured})
    report = pd.DataFrame(rows)
    spearman = float(report["measured_s"].corr(report["predicted_s"], method="spearman")) \
        if len(report) > 1 else float("nan")
    return report, spearman


def calibrated_topology(base: dict[str, Any], fit: CostFit, name: str) -> dict[str, Any]:
    """The base topology config with fitted bandwidths/latencies, also as the simulator's
    `calibration` keys (expert_fixed_s, expert_per_token_s, *_bw_GBps, *_latency_us)."""
    fitted = {"expert_fixed_s": fit.expert_fixed_s, "expert_per_token_s": fit.expert_per_token_s}
    for level, bw in (("intra", fit.intra_node_bw), ("inter", fit.inter_node_bw)):
        if bw:
            fitted[f"{level}_node_bw_GBps"] = bw / 1e9
        fitted[f"{level}_node_latency_us"] = fit.comm_fixed_s / EXCHANGES_PER_LAYER * 1e6
    topo = {**base, **{k: v for k, v in fitted.items() if k.endswith(("GBps", "us"))}}
    topo["name"] = name
    topo["calibration"] = fitted
    return topo


def plot_comparison(report: pd.DataFrame, path: Path) -> None:
    """Predicted vs measured MoE-layer time per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(report["measured_s"] * 1e3, report["predicted_s"] * 1e3)
    for _, r in report.iterrows():
        ax.annotate(r["run"], (r["measured_s"] * 1e3, r["predicted_s"] * 1e3), fontsize=8)
    hi = 1.1e3 * max(report["measured_s"].max(), report["predicted_s"].max())
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set(xlabel="measured MoE-layer time per step (ms)", ylabel="predicted (ms)", title="calibration")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
