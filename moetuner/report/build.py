"""Build the whole report of a study's results folder: table, figures, Markdown and HTML."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moetuner.atomic import write_atomic, write_json_atomic
from moetuner.report import figures
from moetuner.report.collect import read_placements, results_table, summary_metrics
from moetuner.report.document import write_html, write_markdown


@dataclass
class Report:
    table: pd.DataFrame  # one row per (placement, evaluation trace)
    metrics: dict[str, float]
    figures: dict[str, Path]
    files: list[Path]


def draw_figures(results: Path, table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """The five figures, in report order."""
    trace, topology, best = figures.showcase(table)
    case = f"{trace} on {topology}"
    loads = figures.showcase_loads(results, trace, topology, best)
    return {
        "load_heatmap": figures.load_heatmaps(loads, case, out / "load_heatmap.png"),
        "gpu_load_box": figures.load_boxplots(loads, case, out / "gpu_load_box.png"),
        "a2a_tail": figures.a2a_tail(results, table, trace, topology, out / "a2a_tail.png"),
        "predicted_vs_measured": figures.predicted_vs_measured(table, out / "predicted_vs_measured.png"),
        "solve_time": figures.solve_time(read_placements(results), out / "solve_time.png"),
    }


def build_report(results: str | Path, out: str | Path, title: str, notes: Sequence[str] = ()) -> Report:
    """Write summary.csv, summary_metrics.json, the figures, report.md and report.html under `out`."""
    results, out = Path(results), Path(out)
    table = results_table(results)
    metrics = summary_metrics(table)
    drawn = draw_figures(results, table, out)
    files = [write_atomic(out / "summary.csv", lambda tmp: table.to_csv(tmp, index=False)),
             write_json_atomic(out / "summary_metrics.json", metrics),
             write_markdown(out / "report.md", title, table, drawn, notes),
             write_html(out / "report.html", title, table, drawn, notes)]
    return Report(table, metrics, drawn, [*files, *drawn.values()])
