"""Commit the default study's results table and render README's headline from it.

    .venv/bin/python benchmarks/readme_headline.py --note "2 shared cores, 4 min 30 s"   # after the study ran

Copies `results/default/report/summary.csv` (moetuner-report's table of every placement and evaluation on the
study's main split) and `splits.csv` (every split of the re-split trace) to docs/results/default_study/, writes
- headline.csv: per evaluation and (topology, replicas), each solver's speedup vs contiguous with its
  paired 95% bootstrap interval over the main split's steps (the report's headline tables; the best of each
  row in bold);
- headline_splits.csv: per cell the speedup in each split, the mean and the 95% interval over splits
  (resampling splits, then steps; the report's headline_splits.csv as shown);
- headline_margins.csv: per setting the winner's speedup over the runner-up within the main split, across
  splits and over splits, and the verdict (`faster` only when the runner-up is beaten in every split);
- bounds.csv: per held-out setting (topology, replicas) each solver's gap_to_bound, its time over the
  setting's fixed-placement lower bound (the study's `bound: true`);
- phases.csv: the report's phases table (each phase of the v2_lite deployment on its own unit), numbers rounded;
- serve.csv: the served placements on shaped links, measured vs predicted step time in total and on
  the transfers alone, and the share of the prediction the emulation waits out from the cost model
  (runs on unshaped links are left out and counted in run.json's note);
and run.json (command, date, note), then renders the marked tables of README.md and docs/
(benchmarks/render_tables.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd

from moetuner import PROJECT_ROOT
from moetuner.atomic import write_atomic
from moetuner.report.headline import (eval_title, headline_intervals, headline_tables, headline_trace, split_display,
                                      verdict)
from render_tables import main as render  # benchmarks/render_tables.py
from table import command_line, write_run_record  # benchmarks/table.py

OUT = PROJECT_ROOT / "docs" / "results" / "default_study"
REPORT_FILES = ("summary.csv", "splits.csv", "headline_splits.csv", "headline_margins.csv", "phases.csv")
"""What this script reads from the study's report folder (moetuner.report.build.build_report writes them)."""


def headline_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation and setting: eval, topology, replicas, then per solver 'speedup (low-high)',
    the row's best in bold."""
    trace = headline_trace(table)
    intervals = headline_intervals(table, trace)
    rows = []
    for ev, speedups in headline_tables(table, trace).items():
        low, high = intervals[ev]
        for key, row in speedups.iterrows():
            cells = {"eval": eval_title(trace, ev), "topology": key[0], "replicas": int(key[1])}
            for solver, value in row.items():
                if pd.isna(value):
                    cells[solver] = "-"
                    continue
                text = f"{value:.3f}"
                text = f"**{text}**" if value == row.max() else text
                cells[solver] = f"{text} ({low.loc[key, solver]:.3f}-{high.loc[key, solver]:.3f})"
            rows.append(cells)
    return pd.DataFrame(rows)


def split_rows(summary: pd.DataFrame, trace: str) -> pd.DataFrame:
    """The report's headline_splits.csv as shown: per evaluation, setting and solver the speedup vs contiguous in
    each split, their mean, the 95% interval over splits and whether contiguous is beaten in every split."""
    frames = [split_display(summary, ev).assign(eval=eval_title(trace, ev)) for ev in summary["eval"].unique()]
    shown = pd.concat(frames) if frames else pd.DataFrame(columns=["eval"])
    return shown[["eval", *(c for c in shown.columns if c != "eval")]]


def margin_rows(margins: pd.DataFrame, main_seed: int) -> pd.DataFrame:
    """The report's headline_margins.csv as shown: per evaluation and setting the winner, the runner-up, the
    winner's speedup over it (95% interval over the main split's steps; range across splits; 95% interval over
    splits) and the verdict (headline.verdict: `faster` only when the runner-up is beaten in every split)."""
    def span(low: float, high: float) -> str:
        return "-" if pd.isna(low) else f"{low:.3f}-{high:.3f}"

    return pd.DataFrame({
        "eval": margins["eval"], "topology": margins["topology"], "replicas": margins["replicas"],
        "winner": margins["winner"], "runner_up": margins["runner_up"],
        f"split {main_seed} (95%, steps)": [span(lo, hi) for lo, hi in zip(margins["low"], margins["high"])],
        "splits": margins["splits"],
        "across splits (min-max)": [span(lo, hi) for lo, hi in zip(margins["split_min"], margins["split_max"])],
        "over splits (95%)": [span(lo, hi) for lo, hi in zip(margins["split_low"], margins["split_high"])],
        "verdict": [verdict(row) for _, row in margins.iterrows()]})


def bound_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per held-out setting of the headline trace: the fixed-placement bound's setting and each solver's
    gap_to_bound (3 decimals), the row's smallest in bold."""
    held = table[(table["trace"] == headline_trace(table)) & (table["eval"] == "heldout")]
    gaps = held.pivot_table(index=["topology", "replicas"], columns="solver", values="gap_to_bound")
    rows = []
    for (topology, replicas), row in gaps.iterrows():
        cells = {"topology": topology, "replicas": int(replicas)}
        for solver, value in row.items():
            cells[solver] = "-" if pd.isna(value) else (f"**{value:.3f}**" if value == row.min() else f"{value:.3f}")
        rows.append(cells)
    return pd.DataFrame(rows)


def serve_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(served placements on shaped links: measured and predicted us per step, errors, injected share;
    how many served runs were on unshaped links and left out)."""
    served = table.dropna(subset=["measured_layer_time_s"])
    shaped = served[served["serve_links_shaped"].fillna(False).astype(bool)]
    rows = pd.DataFrame({
        "placement": shaped["solver"] + " r" + shaped["replicas"].astype(str),
        "predicted_us": (shaped["served_predicted_layer_time_s"] * 1e6).round(1),
        "measured_us": (shaped["measured_layer_time_s"] * 1e6).round(1),
        "error": shaped["measured_layer_time_s"] / shaped["served_predicted_layer_time_s"] - 1,
        "transfer_error": shaped["comm_rel_error"],
        "injected_share": shaped["injected_share"]})
    return rows, len(served) - len(shaped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=PROJECT_ROOT / "results" / "default")
    parser.add_argument("--note", default="", help="how the study ran (machine, wall time)")
    parser.add_argument("--split-seed", type=int, default=0, help="the study's main split seed (`split:`; default 0)")
    args = parser.parse_args()
    report = args.results / "report"
    missing = [name for name in REPORT_FILES if not (report / name).is_file()]
    if missing:
        sys.exit(f"{report}: {missing} missing: run the study first (bash bootstrap.sh study)")
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report / "summary.csv", OUT / "summary.csv")
    shutil.copyfile(report / "splits.csv", OUT / "splits.csv")
    table = pd.read_csv(OUT / "summary.csv")
    trace = headline_trace(table)
    write_atomic(OUT / "headline.csv", lambda tmp: headline_rows(table).to_csv(tmp, index=False))
    splits = split_rows(pd.read_csv(report / "headline_splits.csv"), trace)
    write_atomic(OUT / "headline_splits.csv", lambda tmp: splits.to_csv(tmp, index=False))
    margins = margin_rows(pd.read_csv(report / "headline_margins.csv"), args.split_seed)
    write_atomic(OUT / "headline_margins.csv", lambda tmp: margins.to_csv(tmp, index=False))
    write_atomic(OUT / "bounds.csv", lambda tmp: bound_rows(table).to_csv(tmp, index=False))
    phases = pd.read_csv(report / "phases.csv").round(4)
    write_atomic(OUT / "phases.csv", lambda tmp: phases.to_csv(tmp, index=False))
    serve, unshaped = serve_rows(table)
    write_atomic(OUT / "serve.csv", lambda tmp: serve.to_csv(tmp, index=False))
    note = "the default study, `snakemake --cores 2`" + (f"; {args.note}" if args.note else "")
    if unshaped:
        note += f"; {unshaped} serve runs on unshaped links left out"
    write_run_record(OUT, command_line("readme_headline.py", sys.argv[1:]), note)
    sys.argv = sys.argv[:1]
    render()


if __name__ == "__main__":
    main()
