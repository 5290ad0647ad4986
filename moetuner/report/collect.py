"""Read a study's results folder (the layout of the Snakefile) into tables.

    placements/{trace}/{topology}/{solver}-r{replicas}.json
    simulate/{trace}/{topology}/{solver}-r{replicas}/{eval}/metrics.json, per_layer.csv
    serve/{trace}/{topology}/{solver}-r{replicas}/metrics.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from moetuner.solvers.mip import relative_gap

KEY = ["trace", "topology", "solver", "replicas"]
RUN_DIR = re.compile(r"(?P<solver>[a-z_]+)-r(?P<replicas>\d+)$")
TABLE_COLUMNS = ["trace", "topology", "solver", "replicas", "eval", "predicted_layer_time_s",
                 "measured_layer_time_s", "served_predicted_layer_time_s", "speedup_vs_contiguous", "compute_tail_s",
                 "compute_tail_ratio", "a2a_tail_s", "solve_seconds", "gap", "status"]


DISPATCH_METRICS = ("layer_time_s", "speedup_vs_contiguous", "compute_time_s", "a2a_time_s")
"""Metrics of each dispatch a simulate run scored (metrics.json by_dispatch), read as `<metric>.<dispatch>`."""


class ReportError(ValueError):
    """A results folder cannot be reported; the message names the problem and the fix."""


def parse_run_dir(name: str) -> tuple[str, int]:
    """'eplb-r1' -> ('eplb', 1)."""
    match = RUN_DIR.match(name)
    if match is None:
        raise ReportError(f"folder {name!r} is not named <solver>-r<replicas>; use the study's layout")
    return match["solver"], int(match["replicas"])


def placement_path(results: Path, trace: str, topology: str, solver: str, replicas: int) -> Path:
    return results / "placements" / trace / topology / f"{solver}-r{replicas}.json"


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def read_placements(results: Path) -> pd.DataFrame:
    """One row per placement: KEY, solve_seconds, gap, status, problem size (layers, experts, gpus)."""
    rows = []
    for path in sorted((results / "placements").glob("*/*/*.json")):
        if path.name.endswith((".vllm.json", ".sglang.json")):  # engine files beside each placement
            continue
        doc = json.loads(path.read_text())
        solver, replicas = parse_run_dir(path.stem)
        phy2log = np.asarray(doc["physical_to_logical_map"])
        rows.append({"trace": path.parent.parent.name, "topology": path.parent.name, "solver": solver,
                     "replicas": replicas, "solve_seconds": float(doc.get("solve_seconds") or 0.0),
                     "gap": _or_nan(relative_gap(doc.get("objective"), doc.get("bound"))), "status": doc.get("status"),
                     "layers": phy2log.shape[0], "experts": int(doc.get("num_experts", phy2log.max() + 1)),
                     "gpus": int(doc["num_gpus"])})
    return pd.DataFrame(rows, columns=[*KEY, "solve_seconds", "gap", "status", "layers", "experts", "gpus"])


def read_metrics(results: Path, stage: str, depth: int) -> pd.DataFrame:
    """metrics.json of every `stage` run as rows (KEY [+ eval] + the metrics); depth 4 adds `eval`."""
    rows = []
    pattern = "/".join(["*"] * depth) + "/metrics.json"
    for path in sorted((results / stage).glob(pattern)):
        run = path.parent if depth == 3 else path.parent.parent
        solver, replicas = parse_run_dir(run.name)
        row = {"trace": run.parent.parent.name, "topology": run.parent.name, "solver": solver, "replicas": replicas}
        if depth == 4:
            row["eval"] = path.parent.name
        doc = json.loads(path.read_text())
        row.update({k: v for k, v in doc.items() if np.isscalar(v)})
        for dispatch, scalars in doc.get("by_dispatch", {}).items():  # moetuner-simulate dispatches=[...]
            row.update({f"{k}.{dispatch}": scalars[k] for k in DISPATCH_METRICS if k in scalars})
        rows.append(row)
    return pd.DataFrame(rows)


def speedup_vs_contiguous(sim: pd.DataFrame) -> pd.Series:
    """Layer time of the contiguous placement (replicas 0, same trace/topology/eval) / this layer time."""
    base = sim[(sim.solver == "contiguous") & (sim.replicas == 0)].set_index(["trace", "topology", "eval"])
    ref = sim.join(base["layer_time_s"].rename("base"), on=["trace", "topology", "eval"])["base"]
    return ref / sim["layer_time_s"]


def serve_times(serve: pd.DataFrame) -> pd.DataFrame:
    """Serve runs in target seconds: an emulated run's measured time / dilation (target_moe_layer_time_s)
    and the simulator's prediction on exactly the served steps; a plain run's measured time as is."""
    target = serve.get("target_moe_layer_time_s", pd.Series(np.nan, index=serve.index))
    predicted = serve.get("predicted_moe_layer_time_s", pd.Series(np.nan, index=serve.index))
    return serve.assign(moe_layer_time_s=target.fillna(serve["moe_layer_time_s"]),
                        served_predicted_layer_time_s=predicted)


def results_table(results: str | Path) -> pd.DataFrame:
    """The study's results: one row per (placement, evaluation trace), TABLE_COLUMNS (then
    `speedup_vs_contiguous.<dispatch>` for every dispatch the simulate runs scored), sorted."""
    results = Path(results)
    sim = read_metrics(results, "simulate", 4)
    if sim.empty:
        raise ReportError(f"{results}: no simulate/*/*/*/*/metrics.json; run the study (snakemake) first")
    table = sim.merge(read_placements(results), on=KEY, how="left")
    serve = read_metrics(results, "serve", 3)
    if not serve.empty:
        measured = serve_times(serve)[KEY + ["moe_layer_time_s", "served_predicted_layer_time_s"]]
        table = table.merge(measured.assign(eval="heldout"), on=KEY + ["eval"], how="left")
    else:
        table["moe_layer_time_s"] = table["served_predicted_layer_time_s"] = np.nan
    table = table.assign(predicted_layer_time_s=table["layer_time_s"], measured_layer_time_s=table["moe_layer_time_s"],
                         speedup_vs_contiguous=speedup_vs_contiguous(table), compute_tail_s=table["compute_time_s"],
                         a2a_tail_s=table["a2a_time_s"])
    per_dispatch = sorted(c for c in table.columns if c.startswith("speedup_vs_contiguous."))
    return table[TABLE_COLUMNS + per_dispatch].sort_values(["trace", "topology", "eval", "replicas", "solver"]) \
        .reset_index(drop=True)


def summary_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Scalars for the parent run: best held-out speedup per (trace, topology) and per solver means."""
    held = table[table["eval"] == "heldout"]
    metrics = {f"best_speedup.{t}.{g}": float(s.max()) for (t, g), s in
               held.groupby(["trace", "topology"])["speedup_vs_contiguous"]}
    metrics.update({f"mean_speedup.{s}": float(v) for s, v in held.groupby("solver")["speedup_vs_contiguous"].mean().items()})
    metrics["num_placements"] = float(len(table[KEY].drop_duplicates()))
    return metrics


def per_layer(results: str | Path, trace: str, topology: str, solver: str, replicas: int,
              eval_name: str = "heldout") -> pd.DataFrame:
    """The simulator's per_layer.csv of one run."""
    path = Path(results) / "simulate" / trace / topology / f"{solver}-r{replicas}" / eval_name / "per_layer.csv"
    return pd.read_csv(path)
