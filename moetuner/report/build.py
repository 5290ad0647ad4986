"""Build the whole report of a study's results folder: headline, regime figure, figures, appendix table.

The document is a list of `document.Section`s in reading order; `report_sections` assembles it, and a
further part of the report is one more section in that list.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moetuner.atomic import write_atomic, write_json_atomic, write_text_atomic
from moetuner.report import figures
from moetuner.report.collect import (ILP2_SKIPPED, main_split, read_placements, results_table, split_table,
                                     step_times, summary_metrics)
from moetuner.report.document import (Section, figure_section, html_table, markdown_table, table_section, write_html,
                                      write_markdown)
from moetuner.report.headline import (MARGIN_COLUMNS, Headline, Intervals, Margins, dispatch_tables, eval_title, headline_intervals,
                                      headline_long, headline_metrics, headline_sentences, headline_tables,
                                      headline_trace, html_headline, markdown_headline, regime_sentence,
                                      serve_sentence, split_display, split_summary, winner_margins)
from moetuner.report.regime import regime_figure
from moetuner.study.targets import LAYOUT, regime_path


@dataclass
class Report:
    table: pd.DataFrame  # one row per (placement, evaluation trace)
    metrics: dict[str, float]
    figures: dict[str, Path]
    files: list[Path]
    headline: str  # the headline section as Markdown


def draw_figures(results: Path, table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """The five detail figures, in report order."""
    trace, topology, best = figures.showcase(table)
    case = f"{trace} on {topology}"
    loads = figures.showcase_loads(results, trace, topology, best)
    return {
        "load_heatmap": figures.load_heatmaps(loads, case, out / "load_heatmap.png"),
        "gpu_load_box": figures.load_boxplots(loads, case, out / "gpu_load_box.png"),
        "a2a_tail": figures.a2a_tail(results, table, trace, topology, out / "a2a_tail.png"),
        "predicted_vs_measured": figures.predicted_vs_measured(table, out / "predicted_vs_measured.png"),
        "solve_time": figures.solve_time(main_split(read_placements(results)), out / "solve_time.png"),
    }


def solver_notes(table: pd.DataFrame, trace: str) -> list[str]:
    """What ran under a solver's name where that is not the name alone (e.g. the MoETuner ILPs without ILP2)."""
    rows = table[(table["trace"] == trace) & (table["solver_label"] != table["solver"])]
    notes = []
    for (solver, label), group in rows.groupby(["solver", "solver_label"]):
        settings = ", ".join(sorted({f"{t} r{int(r)}" for t, r in zip(group["topology"], group["replicas"])}))
        why = ": its ILP2 needs more variables than ilp2_max_vars" if label == ILP2_SKIPPED else ""
        notes.append(f"`{solver}` on {settings} is {label}{why}.")
    return notes


def charge_note(table: pd.DataFrame) -> str:
    """How lp and lp_comm were charged for their per-batch decision (metrics.json dispatch_charge)."""
    if "dispatch_charge" not in table or table["dispatch_charge"].dropna().empty:
        return ""
    kind = table["dispatch_charge"].dropna().iloc[0]
    what = (f"{table['dispatch_budget_us'].dropna().iloc[0]:g} us per solve (a GPU-side solver, as DeepSeek's LPLB)"
            if kind == "budget" else "the measured solve time on the machine that ran the study")
    return (f" The per-batch dispatches `lp` and `lp_comm` pay their decision in every replicated layer-step: "
            f"{what}, plus an all-gather of the per-expert counts.")


def headline_section(tables: Headline, trace: str, by_dispatch: Headline | None = None,
                     intervals: Intervals | None = None, margins: Margins | None = None,
                     notes: Sequence[str] = (), splits: pd.DataFrame | None = None, main_seed: int = 0) -> Section:
    """The report's first section: the generated sentences (and `notes`), one table per evaluation with the
    speedups' 95% intervals, then, where the study re-split the trace, per evaluation the speedups in every
    split (`splits`: headline.split_summary), then per replicated setting the same placements under every
    engine dispatch."""
    sentences = " ".join([*headline_sentences(tables, trace, margins=margins), *notes]) or (
        f"No speedups to report for {trace}: the headline needs a contiguous r0 placement and at least one other "
        "solver on the same topology and evaluation (add `contiguous` to the grid's solvers).")
    intro = ("Speedup vs the contiguous placement (simulator, layer time per step summed over MoE layers), with its "
             "95% interval from a paired bootstrap over the scored steps in parentheses (conditional on the study's "
             f"split of {trace}, seed {main_seed}, and the placements solved on it); rows are topology x replica "
             "budget, the best of each row in bold.")
    md, page = [sentences, "", intro], [f"<p>{html.escape(sentences)}</p>", f"<p>{html.escape(intro)}</p>"]
    for ev, speedups in tables.items():
        name = f"Placements solved on {trace}, scored on {eval_title(trace, ev)}"
        interval = (intervals or {}).get(ev)
        md += ["", f"### {name}", "", markdown_headline(speedups, interval)]
        page += [f"<h3>{html.escape(name)}</h3>", html_headline(speedups, interval)]
    for ev in ([] if splits is None or splits.empty else splits["eval"].unique()):
        name = f"Over re-splits of {trace} by sequence, scored on {eval_title(trace, ev)}"
        shown = split_display(splits, ev)
        about = ("Speedup vs contiguous in each split (each split's own placements, solved on its profile part, "
                 "scored on its held-out part or the other domain), their mean, and the 95% interval over splits "
                 "(a bootstrap that resamples splits, then each drawn split's steps: conditional on the trace only); "
                 "`every split`: contiguous is beaten in each.")
        md += ["", f"### {name}", "", about, "", markdown_table(shown)]
        page += [f"<h3>{html.escape(name)}</h3>", f"<p>{html.escape(about)}</p>", html_table(shown)]
    for setting, speedups in (by_dispatch or {}).items():
        name = f"{setting}, held-out {trace}, by the engine's dispatch (how tokens are split over replicas)"
        md += ["", f"### {name}", "", markdown_headline(speedups)]
        page += [f"<h3>{html.escape(name)}</h3>", html_headline(speedups)]
    return Section("Headline", "\n".join(md), "\n".join(page))


def regime_section(regime: pd.DataFrame | None, out: Path) -> Section:
    """The regime figure (drawn from regime.csv) with a sentence from its numbers."""
    title = "Where placement matters: tokens per step"
    if regime is None:
        path = figures.no_data(out / "regime.png", "speedup vs tokens per step", f"no {LAYOUT['regime']} in the results")
        return Section(title, figures=figure_section("regime", path).figures)
    path = regime_figure(regime, out / "regime.png")
    sentence = regime_sentence(regime) or ""
    return Section(title, sentence, f"<p>{html.escape(sentence)}</p>", figure_section("regime", path).figures)


def report_sections(results: Path, out: Path, table: pd.DataFrame, tables: Headline, trace: str,
                    drawn: dict[str, Path], margins: Margins, extra: Sequence[Section] = (),
                    splits: pd.DataFrame | None = None, main_seed: int = 0,
                    headline_notes: Sequence[str] = ()) -> list[Section]:
    """Headline (with `margins`, headline.winner_margins, and `splits`, headline.split_summary, where the study
    re-split, and `headline_notes` after its sentences), regime, `extra` sections, the detail figures, then the
    raw table (appendix)."""
    regime_csv = Path(regime_path(str(results)))
    regime = pd.read_csv(regime_csv) if regime_csv.is_file() else None
    appendix = table_section("Appendix: all results",
                             "Every placement and evaluation (also in summary.csv).", table)
    notes = [*headline_notes, *solver_notes(table, trace), *filter(None, [serve_sentence(table)])]
    charge = charge_note(table)
    section = headline_section(tables, trace, dispatch_tables(table, trace), headline_intervals(table, trace), margins,
                               [*notes, charge.strip()] if charge else notes, splits, main_seed)
    return [section, regime_section(regime, out), *extra,
            *(figure_section(name, path) for name, path in drawn.items()), appendix]


def margins_long(margins: Margins, trace: str) -> pd.DataFrame:
    """The winner margins of every evaluation as one table: eval, then headline.MARGIN_COLUMNS."""
    frames = [m.reset_index().assign(eval=eval_title(trace, ev)) for ev, m in margins.items()]
    columns = ["eval", *MARGIN_COLUMNS]
    return pd.concat(frames)[columns].reset_index(drop=True) if frames else pd.DataFrame(columns=columns)


def build_report(results: str | Path, out: str | Path, title: str, notes: Sequence[str] = (),
                 extra: Sequence[Section] = (), main_seed: int = 0, headline_notes: Sequence[str] = ()) -> Report:
    """Write summary.csv (the main split, seed `main_seed`), splits.csv (every split of a re-split trace:
    collect.split_table), summary_metrics.json, headline.md/.csv, headline_splits.csv (headline.split_summary),
    headline_margins.csv (margins_long), the figures, report.md and report.html. `headline_notes`: sentences the
    headline adds after its own (the phases' sentences)."""
    results, out = Path(results), Path(out)
    table = results_table(results)
    trace = headline_trace(table)
    tables = headline_tables(table, trace)
    metrics = {**summary_metrics(table), **headline_metrics(tables)}
    steps, per_split = step_times(results), split_table(results, main_seed)
    seeds = sorted(int(s) for s in per_split.loc[per_split["trace"] == trace, "split_seed"].unique())
    summary = split_summary(per_split, steps, trace, main_seed)
    margins = winner_margins(tables, steps, trace, seeds, main_seed)
    drawn = draw_figures(results, table, out)
    sections = report_sections(results, out, table, tables, trace, drawn, margins, extra, summary, main_seed,
                               headline_notes)
    headline_md = f"# {title}\n\n{sections[0].markdown}\n"
    files = [write_atomic(out / "summary.csv", lambda tmp: table.to_csv(tmp, index=False)),
             write_atomic(out / "splits.csv", lambda tmp: per_split.to_csv(tmp, index=False)),
             write_json_atomic(out / "summary_metrics.json", metrics),
             write_text_atomic(out / "headline.md", headline_md),
             write_atomic(out / "headline.csv", lambda tmp: headline_long(tables, trace).to_csv(tmp, index=False)),
             write_atomic(out / "headline_splits.csv", lambda tmp: summary.to_csv(tmp, index=False)),
             write_atomic(out / "headline_margins.csv",
                          lambda tmp: margins_long(margins, trace).to_csv(tmp, index=False)),
             write_markdown(out / "report.md", title, notes, sections),
             write_html(out / "report.html", title, notes, sections)]
    figure_files = [fig.path for section in sections for fig in section.figures]
    return Report(table, metrics, {p.stem: p for p in figure_files}, [*files, *figure_files], headline_md)
