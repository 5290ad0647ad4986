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

from moetuner.serving.emulation import shaped_run
from moetuner.solvers.mip import relative_gap

KEY = ["trace", "topology", "solver", "replicas"]
RUN_DIR = re.compile(r"(?P<solver>[a-z_]+)-r(?P<replicas>\d+)$")
TABLE_COLUMNS = ["trace", "topology", "solver", "solver_label", "replicas", "eval", "predicted_layer_time_s",
                 "measured_layer_time_s", "served_predicted_layer_time_s", "serve_links_shaped", "injected_share",
                 "comm_rel_error", "speedup_vs_contiguous", "speedup_ci_low", "speedup_ci_high",
                 "decision_time_s", "compute_tail_s", "compute_tail_ratio", "a2a_tail_s", "solve_seconds", "gap",
                 "status", "dispatch_charge", "dispatch_budget_us"]


DISPATCH_METRICS = ("layer_time_s", "layer_time_free_s", "decision_time_s", "speedup_vs_contiguous",
                    "speedup_ci_low", "speedup_ci_high", "compute_time_s", "a2a_time_s")
"""Metrics of each dispatch a simulate run scored (metrics.json by_dispatch), read as `<metric>.<dispatch>`."""
PER_DISPATCH_COLUMNS = ("speedup_vs_contiguous", "speedup_ci_low", "speedup_ci_high")
"""Of those, the columns the results table keeps (`<metric>.<dispatch>`)."""
ILP2_SKIPPED = "MoETuner ILP1 + affinity mapping (ILP2 skipped at this size)"


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


def solver_label(solver: str, record: dict) -> str:
    """What ran, from a placement's solve record: the MoETuner ILPs say whether ILP2 ran or was skipped
    (ilp2_max_vars) or failed (then its affinity fallback placed the clusters); other solvers by name."""
    if solver != "moetuner":
        return solver
    if record.get("ilp2_seconds") is not None and not any("ILP2" in r for r in record.get("fallback_reasons", [])):
        return "MoETuner ILP1 + ILP2"
    if any("ilp2_max_vars" in r for r in record.get("fallback_reasons", [])):
        return ILP2_SKIPPED
    return "MoETuner ILP1 + affinity mapping (ILP2 failed)"


def with_intervals(doc: dict) -> dict:
    """A metrics dict with speedup_ci95 [low, high] also as the scalars speedup_ci_low, speedup_ci_high."""
    low, high = doc.get("speedup_ci95") or (np.nan, np.nan)
    return {**doc, "speedup_ci_low": low, "speedup_ci_high": high}


def read_placements(results: Path) -> pd.DataFrame:
    """One row per placement: KEY, solver_label, solve_seconds, gap, status, problem size (layers, experts, gpus)."""
    rows = []
    for path in sorted((results / "placements").glob("*/*/*.json")):
        if path.name.endswith(".sglang.json"):  # the engine file beside each placement that is JSON
            continue
        doc = json.loads(path.read_text())
        solver, replicas = parse_run_dir(path.stem)
        phy2log = np.asarray(doc["physical_to_logical_map"])
        rows.append({"trace": path.parent.parent.name, "topology": path.parent.name, "solver": solver,
                     "solver_label": solver_label(solver, doc), "replicas": replicas, "solve_seconds": float(doc.get("solve_seconds") or 0.0),
                     "gap": _or_nan(relative_gap(doc.get("objective"), doc.get("bound"))), "status": doc.get("status"),
                     "layers": phy2log.shape[0], "experts": int(doc.get("num_experts", phy2log.max() + 1)),
                     "gpus": int(doc["num_gpus"])})
    return pd.DataFrame(rows, columns=[*KEY, "solver_label", "solve_seconds", "gap", "status", "layers", "experts",
                                       "gpus"])


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
        row.update({k: v for k, v in with_intervals(doc).items() if np.isscalar(v)})
        if stage == "serve":
            row["serve_links_shaped"] = shaped_run(doc)
        for dispatch, scalars in doc.get("by_dispatch", {}).items():  # moetuner-simulate dispatches=[...]
            scalars = with_intervals(scalars)
            row.update({f"{k}.{dispatch}": scalars[k] for k in DISPATCH_METRICS if k in scalars})
        rows.append(row)
    return pd.DataFrame(rows)


def speedup_vs_contiguous(sim: pd.DataFrame) -> pd.Series:
    """Layer time of the contiguous placement (replicas 0, same trace/topology/eval) / this layer time."""
    base = sim[(sim.solver == "contiguous") & (sim.replicas == 0)].set_index(["trace", "topology", "eval"])
    ref = sim.join(base["layer_time_s"].rename("base"), on=["trace", "topology", "eval"])["base"]
    return ref / sim["layer_time_s"]


SERVE_COLUMNS = ["moe_layer_time_s", "served_predicted_layer_time_s", "serve_links_shaped", "injected_share",
                 "comm_rel_error"]


def serve_times(serve: pd.DataFrame) -> pd.DataFrame:
    """Serve runs in target seconds: an emulated run's measured time / dilation (target_moe_layer_time_s)
    and the simulator's prediction on exactly the served steps; a plain run's measured time as is.
    Keeps serve_links_shaped, and injected_share / comm_rel_error of emulated runs (NaN otherwise)."""
    missing = pd.Series(np.nan, index=serve.index)
    target = serve.get("target_moe_layer_time_s", missing)
    return serve.assign(moe_layer_time_s=target.fillna(serve["moe_layer_time_s"]),
                        served_predicted_layer_time_s=serve.get("predicted_moe_layer_time_s", missing),
                        injected_share=serve.get("injected_share", missing),
                        comm_rel_error=serve.get("comm_rel_error", missing))


def results_table(results: str | Path) -> pd.DataFrame:
    """The study's results: one row per (placement, evaluation trace), TABLE_COLUMNS (then
    `speedup_vs_contiguous.<dispatch>` for every dispatch the simulate runs scored), sorted."""
    results = Path(results)
    sim = read_metrics(results, "simulate", 4)
    if sim.empty:
        raise ReportError(f"{results}: no simulate/*/*/*/*/metrics.json; run the study (snakemake) first")
    table = sim.merge(read_placements(results), on=KEY, how="left")
    table["solver_label"] = table["solver_label"].fillna(table["solver"])
    serve = read_metrics(results, "serve", 3)
    if not serve.empty:
        measured = serve_times(serve)[KEY + SERVE_COLUMNS]
        table = table.merge(measured.assign(eval="heldout"), on=KEY + ["eval"], how="left")
    else:
        for column in SERVE_COLUMNS:
            table[column] = np.nan
    table = table.assign(predicted_layer_time_s=table["layer_time_s"], measured_layer_time_s=table["moe_layer_time_s"],
                         speedup_vs_contiguous=speedup_vs_contiguous(table), compute_tail_s=table["compute_time_s"],
                         a2a_tail_s=table["a2a_time_s"])
    for column in TABLE_COLUMNS:  # what simulate runs of older versions did not write
        if column not in table:
            table[column] = np.nan
    per_dispatch = sorted(c for c in table.columns if c.split(".")[0] in PER_DISPATCH_COLUMNS and "." in c)
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


def step_times(results: str | Path) -> dict[tuple[str, str, str, int, str], np.ndarray]:
    """Charged seconds per scored step of every simulate run (its own dispatch), keyed by
    (trace, topology, solver, replicas, eval): for paired comparisons between placements. [S] each"""
    out = {}
    for path in sorted(Path(results, "simulate").glob("*/*/*/*/metrics.json")):
        doc = json.loads(path.read_text())
        if "step_times_s" in doc:
            run = path.parent.parent
            solver, replicas = parse_run_dir(run.name)
            out[run.parent.parent.name, run.parent.name, solver, replicas, path.parent.name] = \
                np.asarray(doc["step_times_s"], dtype=float)
    return out


def per_layer(results: str | Path, trace: str, topology: str, solver: str, replicas: int,
              eval_name: str = "heldout") -> pd.DataFrame:
    """The simulator's per_layer.csv of one run."""
    path = Path(results) / "simulate" / trace / topology / f"{solver}-r{replicas}" / eval_name / "per_layer.csv"
    return pd.read_csv(path)
