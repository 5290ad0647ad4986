"""The report's online-rebalancing section: each policy's replay of the study's stream (moetuner-online).

Time is compared with the best static placement (the fastest policy named static*), and where the study
ran `oracle`, "captured" is the share of the hindsight oracle's gain over that best static placement.

Reads every replay's metrics.json (moetuner.study.targets.LAYOUT["online"]:
`<results>/online/<stream>/<topology>-r<R>/<policy>/`) and the timeline.csv beside it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from moetuner.report.document import Figure, Section, html_table, markdown_table
from moetuner.study.targets import find_files

COLUMNS = ["stream", "setting", "policy", "total_time_s", "migration_time_s", "migration_share", "rebalances",
           "experts_moved", "bytes_moved", "slots_changed_per_rebalance", "peak_to_average_load",
           "speedup_vs_contiguous", "vs_best_static", "captured", "solve_seconds_per_rebalance"]
DERIVED = ("vs_best_static", "captured")
CAPTION = ("Per-step speedup vs contiguous of each policy over the stream (simulator), segment boundaries "
           "dashed; a step that follows a stop-the-world migration does not show its wait (see the table).")


def online_runs(results: Path) -> pd.DataFrame:
    """One row per replay found under results/online (empty frame if none). Columns: COLUMNS + run."""
    rows = []
    for path, key in find_files(results, "online"):
        metrics = json.loads(path.read_text())
        rows.append({"stream": key["stream"], "setting": key["setting"], "policy": key["policy"],
                     "run": str(path.parent), **{k: metrics.get(k) for k in COLUMNS[3:] if k not in DERIVED}})
    table = pd.DataFrame(rows, columns=[*COLUMNS, "run"])
    if table.empty:
        return table
    key = ["stream", "setting"]
    best_static = table[table.policy.str.startswith("static")].groupby(key).total_time_s.min()
    oracle = table[table.policy == "oracle"].set_index(key).total_time_s
    nan = float("nan")
    table["vs_best_static"] = [row.total_time_s / best_static.get((row.stream, row.setting), nan)
                               for row in table.itertuples()]
    table["captured"] = [captured(row.total_time_s, best_static.get((row.stream, row.setting), nan),
                                  oracle.get((row.stream, row.setting), nan)) for row in table.itertuples()]
    return table


def captured(total_s: float, best_static_s: float, oracle_s: float) -> float:
    """Share of the hindsight oracle's gain over the best static placement that a policy captured (NaN
    without a static or an oracle run, or when the oracle gains nothing)."""
    gain = best_static_s - oracle_s
    return (best_static_s - total_s) / gain if gain > 0 else float("nan")


def timeline_figure(table: pd.DataFrame, path: Path) -> Path:
    """Per-step speedup vs contiguous of every policy of the first (stream, setting)."""
    from moetuner.plotting import plt, save_figure

    first = table[(table.stream == table.stream.iloc[0]) & (table.setting == table.setting.iloc[0])]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for row in first.itertuples():
        steps = pd.read_csv(Path(row.run) / "timeline.csv")
        ax.plot(steps.step, steps.contiguous_step_time_s / steps.step_time_s, lw=1, label=row.policy)
    segment = steps.segment.to_numpy()
    for b in (steps.step[1:][segment[1:] != segment[:-1]]):
        ax.axvline(b - 0.5, color="grey", ls="--", lw=1)
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set(xlabel="step", ylabel="speedup vs contiguous", title=f"{first.stream.iloc[0]}, {first.setting.iloc[0]}")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def online_section(results: str | Path, out: str | Path) -> Section | None:
    """The section (a sentence, the table, the timeline figure), or None when the study ran no replay."""
    table = online_runs(Path(results))
    if table.empty:
        return None
    shown = table[COLUMNS]
    best = table.loc[table.total_time_s.idxmin()]
    sentence = (f"Serving a shifting stream (segments of different domains) with online rebalancing, migrations "
                f"counted: the fastest policy on {best.stream} ({best.setting}) is {best.policy}, "
                f"{best.vs_best_static:.3f}x the total time of the best static placement, moving {int(best.experts_moved)} experts "
                f"in {int(best.rebalances)} rebalance(s).")
    figure = timeline_figure(table, Path(out) / "online_timeline.png")
    return Section("Online rebalancing", f"{sentence}\n\n{markdown_table(shown)}",
                   f"<p>{html.escape(sentence)}</p>{html_table(shown)}", (Figure(figure, CAPTION),))
