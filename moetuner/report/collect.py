"""Read a study's results folder into tables. The layout is moetuner.study.targets.LAYOUT (placement,
simulate, per_layer, serve), where the study's rules write it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from moetuner.serving.emulation import shaped_run
from moetuner.solvers.mip import relative_gap
from moetuner.study.targets import LAYOUT, find_files, parse_split_variant, per_layer_path

KEY = ["trace", "topology", "solver", "replicas"]
TABLE_COLUMNS = ["trace", "topology", "solver", "solver_label", "replicas", "eval", "predicted_layer_time_s",
                 "measured_layer_time_s", "served_predicted_layer_time_s", "serve_links_shaped", "injected_share",
                 "comm_rel_error", "speedup_vs_contiguous", "speedup_ci_low", "speedup_ci_high",
                 "decision_time_s", "compute_tail_s", "compute_tail_ratio", "a2a_tail_s", "solve_seconds", "gap",
                 "gap_to_bound",
                 "status", "dispatch_charge", "dispatch_budget_us"]


DISPATCH_METRICS = ("layer_time_s", "layer_time_free_s", "decision_time_s", "speedup_vs_contiguous",
                    "speedup_ci_low", "speedup_ci_high", "compute_time_s", "a2a_time_s")
"""Metrics of each dispatch a simulate run scored (metrics.json by_dispatch), read as `<metric>.<dispatch>`."""
PER_DISPATCH_COLUMNS = ("speedup_vs_contiguous", "speedup_ci_low", "speedup_ci_high")
"""Of those, the columns the results table keeps (`<metric>.<dispatch>`)."""
ILP2_SKIPPED = "MoETuner ILP1 + affinity mapping (ILP2 skipped at this size)"


class ReportError(ValueError):
    """A results folder cannot be reported; the message names the problem and the fix."""


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
    for path, key in find_files(results, "placement"):
        doc = json.loads(path.read_text())
        solver, replicas = key["solver"], int(key["replicas"])
        phy2log = np.asarray(doc["physical_to_logical_map"])
        rows.append({"trace": key["trace"], "topology": key["topology"], "solver": solver,
                     "solver_label": solver_label(solver, doc), "replicas": replicas, "solve_seconds": float(doc.get("solve_seconds") or 0.0),
                     "gap": _or_nan(relative_gap(doc.get("objective"), doc.get("bound"))), "status": doc.get("status"),
                     "layers": phy2log.shape[0], "experts": int(doc.get("num_experts", phy2log.max() + 1)),
                     "gpus": int(doc["num_gpus"])})
    return pd.DataFrame(rows, columns=[*KEY, "solver_label", "solve_seconds", "gap", "status", "layers", "experts",
                                       "gpus"])


def read_metrics(results: Path, stage: str) -> pd.DataFrame:
    """metrics.json of every `stage` run (simulate or serve) as rows (KEY [+ eval for simulate] + the metrics)."""
    rows = []
    for path, key in find_files(results, stage):
        row = {"trace": key["trace"], "topology": key["topology"], "solver": key["solver"],
               "replicas": int(key["replicas"])}
        if "evaluate_on" in key:
            row["eval"] = key["evaluate_on"]
        doc = json.loads(path.read_text())
        row.update({k: v for k, v in with_intervals(doc).items() if np.isscalar(v)})
        if stage == "serve":
            row["serve_links_shaped"] = shaped_run(doc)
        for dispatch, scalars in doc.get("by_dispatch", {}).items():  # moetuner-simulate dispatches=[...]
            scalars = with_intervals(scalars)
            row.update({f"{k}.{dispatch}": scalars[k] for k in DISPATCH_METRICS if k in scalars})
        rows.append(row)
    return pd.DataFrame(rows)


def speedup_vs_contiguous(sim: pd.DataFrame, same: Sequence[str] = ("trace", "topology", "eval")) -> pd.Series:
    """Layer time of the contiguous placement (replicas 0, the same `same` columns) / this layer time."""
    same = list(same)
    base = sim[(sim.solver == "contiguous") & (sim.replicas == 0)].set_index(same)
    ref = sim.join(base["layer_time_s"].rename("base"), on=same)["base"]
    return ref / sim["layer_time_s"]


def gap_to_bound(sim: pd.DataFrame, same: Sequence[str] = ("trace", "topology", "replicas", "eval")) -> pd.Series:
    """Layer time over the fixed-placement lower bound of its setting (`bound_step_s`, which one simulate run of
    the setting computed: the study's `bound: true`; the same for every solver there); NaN where none did."""
    same = list(same)
    if "bound_step_s" not in sim:
        return pd.Series(np.nan, index=sim.index)
    bounds = sim.dropna(subset=["bound_step_s"]).groupby(same)["bound_step_s"]
    assert (bounds.nunique() <= 1).all(), "one setting's runs computed different bounds"
    return sim["layer_time_s"] / sim.join(bounds.first().rename("bound"), on=same)["bound"]


def main_split(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the study's main split: those whose trace is not a re-split (`<trace>.split<seed>`)."""
    return frame[[parse_split_variant(t)[1] is None for t in frame["trace"]]] if len(frame) else frame


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


def served_prediction(table: pd.DataFrame) -> pd.Series:
    """The prediction a serve run is judged against: the simulator on exactly the served steps where the run
    recorded it (emulated runs), else the simulate run's layer time (plain runs: a real cluster, or CPU)."""
    missing = pd.Series(np.nan, index=table.index)
    return table.get("served_predicted_layer_time_s", missing).fillna(table.get("predicted_layer_time_s", missing))


def results_table(results: str | Path) -> pd.DataFrame:
    """The study's results: one row per (placement, evaluation trace), TABLE_COLUMNS (then
    `speedup_vs_contiguous.<dispatch>` for every dispatch the simulate runs scored), sorted."""
    results = Path(results)
    sim = main_split(read_metrics(results, "simulate"))
    if sim.empty:
        raise ReportError(f"{results}: no {LAYOUT['simulate']}; run the study (snakemake) first")
    table = sim.merge(read_placements(results), on=KEY, how="left")
    table["solver_label"] = table["solver_label"].fillna(table["solver"])
    serve = read_metrics(results, "serve")
    if not serve.empty:
        measured = serve_times(serve)[KEY + SERVE_COLUMNS]
        table = table.merge(measured.assign(eval="heldout"), on=KEY + ["eval"], how="left")
    else:
        for column in SERVE_COLUMNS:
            table[column] = np.nan
    table = table.assign(predicted_layer_time_s=table["layer_time_s"], measured_layer_time_s=table["moe_layer_time_s"],
                         speedup_vs_contiguous=speedup_vs_contiguous(table), gap_to_bound=gap_to_bound(table),
                         compute_tail_s=table["compute_time_s"],
                         a2a_tail_s=table["a2a_time_s"])
    for column in TABLE_COLUMNS:  # what simulate runs of older versions did not write
        if column not in table:
            table[column] = np.nan
    per_dispatch = sorted(c for c in table.columns if c.split(".")[0] in PER_DISPATCH_COLUMNS and "." in c)
    return table[TABLE_COLUMNS + per_dispatch].sort_values(["trace", "topology", "eval", "replicas", "solver"]) \
        .reset_index(drop=True)


SPLIT_COLUMNS = ["trace", "topology", "solver", "replicas", "eval", "split_seed", "layer_time_s",
                 "speedup_vs_contiguous", "speedup_ci_low", "speedup_ci_high"]


def split_table(results: str | Path, main_seed: int) -> pd.DataFrame:
    """Every simulate run of a trace that was also re-split (a grid's `split_seeds`), one row per split:
    SPLIT_COLUMNS, `trace` the trace itself and `split_seed` the seed it was split with (`main_seed` for the
    study's main split); speedup vs the contiguous r0 placement of the same split and evaluation, and its paired
    95% interval over that split's scored steps. Sorted; empty without re-splits."""
    sim = read_metrics(results, "simulate")
    if sim.empty:
        return pd.DataFrame(columns=SPLIT_COLUMNS)
    names = [parse_split_variant(t) for t in sim["trace"]]
    sim = sim.assign(trace=[trace for trace, _ in names],
                     split_seed=[main_seed if seed is None else seed for _, seed in names])
    sim = sim[sim["trace"].isin({trace for trace, seed in names if seed is not None})]
    sim = sim.assign(speedup_vs_contiguous=speedup_vs_contiguous(sim, ("trace", "topology", "eval", "split_seed")))
    for column in SPLIT_COLUMNS:
        if column not in sim:
            sim[column] = np.nan
    return sim[SPLIT_COLUMNS].sort_values(["trace", "topology", "eval", "replicas", "solver", "split_seed"]) \
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
    for path, key in find_files(results, "simulate"):
        doc = json.loads(path.read_text())
        if "step_times_s" in doc:
            out[key["trace"], key["topology"], key["solver"], int(key["replicas"]), key["evaluate_on"]] = \
                np.asarray(doc["step_times_s"], dtype=float)
    return out


def per_layer(results: str | Path, trace: str, topology: str, solver: str, replicas: int,
              eval_name: str = "heldout") -> pd.DataFrame:
    """The simulator's per_layer.csv of one run."""
    return pd.read_csv(per_layer_path(str(results), trace, topology, solver, replicas, eval_name))
