"""Fit the simulator's cost constants from measured serve runs (per_layer.csv tables).

Compute, per (step, layer, rank) row (least squares):
  compute_s ~ expert_fixed_s * active_slots + expert_per_token_s * pairs
Links, per (step, layer) (every rank waits for the slowest port, so one rank's bytes do not explain
its exchange time; the phase does): the layer's communication time, the mean over ranks of layer_s
minus the largest compute_s, is fitted (non-negative least squares on the simulator's own formula,
`cost.a2a_time`, serial links) by the dispatch and the combine phase, each
  max over ranks of max(send, receive), send = intra bytes / intra_bw + inter bytes / inter_bw +
  the largest latency of a level it sends on; receive alike,
with the bytes of the rank's ports in that phase (the bytes_<phase>_<sent|received>_<level> columns;
`port_phases` writes them as copies for a2a_time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from moetuner.costmodel.cost import CostModel, a2a_time
from moetuner.serving.emulation import shaped_run
from moetuner.serving.measure import PORT_COLUMNS


class CalibrationError(ValueError):
    """The measured runs cannot determine the constants; the message says what to measure."""


@dataclass(frozen=True)
class CostFit:
    expert_fixed_s: float  # per active expert slot per layer
    expert_per_token_s: float  # per (token, expert) pair
    intra_node_latency_s: float | None  # per exchange with a peer in the node; None: never decided a phase
    inter_node_latency_s: float | None  # per exchange with a peer across nodes; None: likewise
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


def port_bytes(per_layer: pd.DataFrame) -> np.ndarray:
    """Bytes through each rank's ports, per (step, layer) group: [groups, ranks, phase, sent|received,
    intra|inter], groups in (step, layer) order."""
    if missing := [c for c in PORT_COLUMNS if c not in per_layer.columns]:
        raise CalibrationError(f"per_layer.csv lacks {missing}; rerun the serve runs with this moetuner")
    table = per_layer.sort_values(["step", "layer", "rank"])
    groups, ranks = table.groupby(["step", "layer"]).ngroups, table["rank"].nunique()
    return table[PORT_COLUMNS].to_numpy(float).reshape(groups, ranks, 2, 2, 2)


def port_phases(ports: np.ndarray) -> np.ndarray:
    """Every (group, phase) exchange as copies of one byte that cost.a2a_time prices from the ranks' port
    bytes alone: rank r (of R) sends its intra / inter bytes to virtual peers R + r / 2R + r and receives
    them from 3R + r / 4R + r (a virtual peer's send or receive is one term of its rank's, so never the
    largest). ports [N, R, 2, 2, 2] (group, rank, phase, sent|received, intra|inter) -> [N, 2, 5R, 5R]"""
    groups, ranks = ports.shape[:2]
    copies = np.zeros((groups, 2, 5 * ranks, 5 * ranks))
    rank = np.arange(ranks)
    for level in range(2):
        copies[:, :, rank, (1 + level) * ranks + rank] = ports[:, :, :, 0, level].transpose(0, 2, 1)
        copies[:, :, (3 + level) * ranks + rank, rank] = ports[:, :, :, 1, level].transpose(0, 2, 1)
    return copies


def port_cost(ranks: int, seconds_per_byte: np.ndarray, latency: np.ndarray) -> CostModel:
    """The serial-link cost model of port_phases' 5R peers: level l's links (intra, inter) at
    1 / seconds_per_byte[l] B/s with latency[l]."""
    size, rank = 5 * ranks, np.arange(ranks)
    level = -np.ones((size, size), dtype=np.int64)
    for lvl in range(2):
        level[rank, (1 + lvl) * ranks + rank] = lvl
        level[(3 + lvl) * ranks + rank, rank] = lvl
    rate = [np.inf if spb <= 0 else 1.0 / spb for spb in seconds_per_byte]
    bandwidth = np.where(level == 0, rate[0], np.where(level == 1, rate[1], np.inf))
    lat = np.where(level == 0, latency[0], np.where(level == 1, latency[1], 0.0))
    return CostModel(per_token_s=0.0, floor_s=0.0, fixed_s=0.0, token_bytes=1.0, bandwidth=bandwidth, latency=lat,
                     node=np.zeros(size, dtype=np.int64))


def priced_phases(copies: np.ndarray, seconds_per_byte: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """cost.a2a_time of port_phases' copies [N, 2, 5R, 5R] under those links. -> [N, 2]"""
    return a2a_time(copies, port_cost(copies.shape[-1] // 5, seconds_per_byte, latency))


def phase_times(ports: np.ndarray, seconds_per_byte: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """The simulator's a2a_time of every phase from the ports' bytes (serial links: a rank's send is its
    intra bytes / intra bandwidth + inter bytes / inter bandwidth + the largest latency of a level it
    sends on; receive alike). ports [N, R, 2, 2, 2] (group, rank, phase, sent|received, intra|inter),
    seconds_per_byte and latency [2] (intra, inter) -> [N, 2]"""
    return priced_phases(port_phases(ports), seconds_per_byte, latency)


def fit_links(ports: np.ndarray, comm_s: np.ndarray) -> np.ndarray:
    """[1/intra_bw, 1/inter_bw, intra latency, inter latency] (>= 0) that make the summed phase times
    fit comm_s [N]; the max over ports makes it piecewise linear, so a few starts, best kept. A latency
    or seconds per byte that decides no phase (e.g. the intra-node ones when every busiest port crosses
    nodes) is NaN."""
    scale_t = max(float(np.median(comm_s)), 1e-12)
    scale_b = max(float(ports.sum(axis=(1, 2, 3)).max(axis=-1).mean()), 1.0)
    copies = port_phases(ports)

    def residual(x: np.ndarray) -> np.ndarray:
        return (priced_phases(copies, x[:2] * scale_t / scale_b, x[2:] * scale_t).sum(1) - comm_s) / scale_t

    best = None
    for start in ([1.0, 1.0, 0.1, 0.1], [0.1, 1.0, 0.05, 0.2], [1.0, 0.1, 0.2, 0.05]):
        sol = least_squares(residual, np.array(start), bounds=(0, np.inf), x_scale=1.0)
        best = sol if best is None or sol.cost < best.cost else best
    links = np.concatenate([best.x[:2] * scale_t / scale_b, best.x[2:] * scale_t])
    fitted = priced_phases(copies, links[:2], links[2:])
    undecided = []
    for i in range(4):  # a constant that decides no phase is not determined by these runs
        moved = links.copy()
        moved[i] = 0.0
        undecided.append(np.allclose(priced_phases(copies, moved[:2], moved[2:]), fitted, rtol=1e-6, atol=0.0))
    return np.where(undecided, np.nan, links)


def layer_comm_s(per_layer: pd.DataFrame) -> np.ndarray:
    """Measured communication per (step, layer): mean over ranks of layer_s minus the largest compute_s."""
    by = per_layer.groupby(["step", "layer"])
    return (by["layer_s"].mean() - by["compute_s"].max()).to_numpy(float)


def fit_costs(per_layer: pd.DataFrame) -> CostFit:
    """Fit the cost constants on the rows of one or more runs' per_layer.csv tables (each run's
    steps numbered apart: see `stack_runs`)."""
    if per_layer.groupby(["step", "layer"]).ngroups < 4:
        raise CalibrationError(f"{len(per_layer)} per-layer rows in fewer than 4 (step, layer) groups cannot "
                               f"fit 6 constants; give runs with more steps or more placements")
    compute = nonneg_lstsq(per_layer[["active_slots", "pairs"]].to_numpy(float),
                            per_layer["compute_s"].to_numpy(float))
    ports = port_bytes(per_layer)
    links = fit_links(ports, layer_comm_s(per_layer))
    bw = [None if np.isnan(c) or c <= 0 else float(1 / c) for c in links[:2]]
    return CostFit(expert_fixed_s=float(compute[0]), expert_per_token_s=float(compute[1]),
                   intra_node_latency_s=None if np.isnan(links[2]) else float(links[2]),
                   inter_node_latency_s=None if np.isnan(links[3]) else float(links[3]),
                   intra_node_bw=bw[0], inter_node_bw=bw[1])


def stack_runs(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All runs' rows in one table, steps renumbered so no two runs share a (step, layer) group."""
    tables, offset = [], 0
    for table in runs.values():
        tables.append(table.assign(step=table["step"] - table["step"].min() + offset))
        offset = int(tables[-1]["step"].max()) + 1
    return pd.concat(tables, ignore_index=True)


def predicted_layer_times(per_layer: pd.DataFrame, fit: CostFit) -> pd.Series:
    """Fitted seconds of every (step, layer): dispatch + the largest compute + combine."""
    spb = np.array([1 / bw if bw else 0.0 for bw in (fit.intra_node_bw, fit.inter_node_bw)])
    comm = phase_times(port_bytes(per_layer), spb,
                       np.array([fit.intra_node_latency_s or 0.0, fit.inter_node_latency_s or 0.0])).sum(1)
    compute = fit.expert_fixed_s * per_layer["active_slots"] + fit.expert_per_token_s * per_layer["pairs"]
    return compute.groupby([per_layer["step"], per_layer["layer"]]).max() + comm


def moe_layer_time(per_layer: pd.DataFrame) -> float:
    """Measured: per step, summed layer times per rank, max over ranks; mean over steps."""
    return float(per_layer.groupby(["step", "rank"])["layer_s"].sum().groupby(level=0).max().mean())


def compare(runs: dict[str, pd.DataFrame], fit: CostFit) -> tuple[pd.DataFrame, float]:
    """Predicted vs measured MoE-layer time per run, relative error, and Spearman rank correlation."""
    rows = []
    for name, table in runs.items():
        measured = moe_layer_time(table)
        predicted = float(predicted_layer_times(table, fit).groupby(level=0).sum().mean())
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
    for level, bw, latency in (("intra", fit.intra_node_bw, fit.intra_node_latency_s),
                               ("inter", fit.inter_node_bw, fit.inter_node_latency_s)):
        if bw:
            fitted[f"{level}_node_bw_GBps"] = bw / 1e9
        if latency is not None:
            fitted[f"{level}_node_latency_us"] = latency * 1e6
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


def split_shaped(dirs: list[str]) -> tuple[list[str], list[str]]:
    """(runs whose links were measured, emulated runs on unshaped loopback): the latter measured no
    link of the target (emulation.enabled=auto without root), so they are left out of every fit."""
    kept, unshaped = [], []
    for d in dirs:
        path = Path(d) / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        (kept if shaped_run(metrics) else unshaped).append(d)
    return kept, unshaped


def read_runs(dirs: list[str]) -> dict[str, pd.DataFrame]:
    """per_layer.csv of every serve run, keyed by the run folder's name (with its parent's when names
    repeat, e.g. eplb/rep0); emulated runs in target units."""
    runs = {}
    paths = [Path(d) for d in dirs]
    repeated = len({d.name for d in paths}) < len(paths)
    for d in paths:
        key = f"{d.parent.name}/{d.name}" if repeated else d.name
        if not (d / "per_layer.csv").is_file():
            raise CalibrationError(f"{d}: no per_layer.csv; give folders written by moetuner-serve")
        table = pd.read_csv(d / "per_layer.csv")
        metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
        runs[key] = undilate(table, metrics) if "dilation" in metrics else table
    return runs


def undilate(table: pd.DataFrame, metrics: dict) -> pd.DataFrame:
    """An emulated run's rows in the target's units: seconds / D, replayed bytes x the target's bytes
    per replayed byte (bf16 rows of `hidden` values for float32 rows of hidden / shape_scale)."""
    out = table.copy()
    seconds = [c for c in out.columns if c.endswith("_s")]
    out[seconds] = out[seconds] / float(metrics["dilation"])
    volumes = [c for c in out.columns if c.startswith("bytes_")]
    out[volumes] = out[volumes] * float(metrics["target_bytes_per_byte"])
    return out
