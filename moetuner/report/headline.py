"""The report's headline: per evaluation, a topology x replicas by solver table of speedups vs contiguous
(with their paired 95% bootstrap intervals), the best of each row in bold, and a few sentences generated
from those numbers. A sentence calls a placement faster than another only when the paired interval of
their speedup excludes 1.0 (costmodel/intervals.py); served runs on unshaped links are left out.

All functions are pure (tables in, tables/text out); `collect.results_table` gives their input.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from moetuner.costmodel.intervals import (beaten_in_every_split, distinguishable, speedup_interval,
                                          split_speedup_interval)
from moetuner.costmodel.settings import DISPATCHES
from moetuner.report.collect import served_prediction
from moetuner.study.targets import split_variant

HELDOUT = "heldout"
BASELINE = "contiguous"
Headline = dict[str, pd.DataFrame]
"""eval name -> speedup table: index (topology, replicas), columns solvers, NaN where not solved."""
Intervals = dict[str, tuple[pd.DataFrame, pd.DataFrame]]
"""eval name -> (low, high) tables shaped like the Headline's: the speedup's 95% interval."""
Margins = dict[str, pd.DataFrame]
"""eval name -> per setting (index topology, replicas): winner, runner_up, low, high (the winner's paired
95% interval of its speedup over the runner-up)."""
StepTimes = Mapping[tuple[str, str, str, int, str], np.ndarray]
"""(trace, topology, solver, replicas, eval) -> seconds per scored step (collect.step_times)."""


def headline_trace(table: pd.DataFrame) -> str:
    """The trace the headline is about: among traces scored on another domain (else all), the one with the
    most results rows; ties by name."""
    transferred = table.loc[table["eval"] != HELDOUT, "trace"].unique()
    pool = table[table["trace"].isin(transferred)] if len(transferred) else table
    sizes = pool.groupby("trace").size()
    return str(sorted(sizes.index, key=lambda t: (-sizes[t], t))[0])


def headline_tables(table: pd.DataFrame, trace: str, value: str = "speedup_vs_contiguous") -> Headline:
    """Per evaluation of `trace` (held-out first, then other domains by name): speedup vs contiguous (or
    another column `value`) with rows (topology, replicas) and one column per solver except contiguous itself."""
    rows = table[(table["trace"] == trace) & (table["solver"] != BASELINE)]
    evals = sorted(rows["eval"].unique(), key=lambda e: (e != HELDOUT, e))
    return {ev: rows[rows["eval"] == ev].pivot_table(index=["topology", "replicas"], columns="solver",
                                                       values=value, aggfunc="first")
            .rename_axis(columns=None).sort_index()
            for ev in evals}


def headline_intervals(table: pd.DataFrame, trace: str) -> Intervals:
    """The (low, high) tables of the speedups' 95% intervals (speedup_ci_low / _high columns), as headline_tables."""
    if not {"speedup_ci_low", "speedup_ci_high"} <= set(table.columns):
        return {}
    low, high = headline_tables(table, trace, "speedup_ci_low"), headline_tables(table, trace, "speedup_ci_high")
    return {ev: (low[ev], high[ev]) for ev in low}


MARGIN_COLUMNS = ["topology", "replicas", "winner", "runner_up", "low", "high", "splits", "split_min", "split_max",
                  "split_low", "split_high", "every_split"]


def split_step_times(steps: StepTimes, trace: str, topology: str, solver: str, replicas: int, ev: str,
                     seeds: Sequence[int], main_seed: int) -> list[np.ndarray] | None:
    """Seconds per scored step of one placement in each split of `seeds` (each solved on that split's profile),
    or None where a split's run is missing. [S_d] each"""
    out = [steps.get((split_variant(trace, seed, main_seed), topology, solver, replicas, ev)) for seed in seeds]
    return None if any(s is None for s in out) else out


def over_splits(base_s: Sequence[np.ndarray], placement_s: Sequence[np.ndarray]) -> dict[str, float | bool]:
    """A placement against a rival over re-splits (each split's own placements and scored steps): the speedup in
    each split (`per_split`, in the order given), its min and max, the interval over splits (resampling splits,
    then steps: intervals.split_speedup_interval) and whether the rival is beaten in every split."""
    per_split = [float(np.mean(b) / np.mean(p)) for b, p in zip(base_s, placement_s)]
    low, high = split_speedup_interval(base_s, placement_s)
    return {"per_split": per_split, "splits": len(per_split), "split_min": min(per_split),
            "split_max": max(per_split), "split_low": low, "split_high": high,
            "every_split": beaten_in_every_split(per_split)}


def winner_margins(tables: Headline, steps: StepTimes, trace: str, seeds: Sequence[int] = (),
                   main_seed: int = 0) -> Margins:
    """Per evaluation and setting with two or more solvers: the fastest (winner), the next (runner-up), and the
    paired bootstrap interval of the winner's speedup over the runner-up on the same scored steps (of the main
    split). With re-split `seeds` (the main split's among them) and both placements' runs in every one of them,
    also the winner's speedup over the runner-up in the worst and best split, its interval over splits and
    whether the runner-up is beaten in every split (over_splits; `splits` 1 and NaN otherwise). Settings whose
    step times are missing are left out."""
    out = {}
    for ev, speedups in tables.items():
        rows = []
        for (topology, replicas), row in speedups.iterrows():
            ranked = row.dropna().sort_values(ascending=False)
            if len(ranked) < 2:
                continue
            winner, runner = ranked.index[0], ranked.index[1]
            a, b = steps.get((trace, topology, runner, replicas, ev)), steps.get((trace, topology, winner, replicas, ev))
            if a is None or b is None or len(a) != len(b):
                continue
            low, high = speedup_interval(a, b)
            margin = {"topology": topology, "replicas": replicas, "winner": winner, "runner_up": runner,
                      "low": low, "high": high, "splits": 1, "split_min": np.nan, "split_max": np.nan,
                      "split_low": np.nan, "split_high": np.nan, "every_split": np.nan}
            runs = [split_step_times(steps, trace, topology, s, replicas, ev, seeds, main_seed) for s in (runner, winner)]
            if len(seeds) > 1 and all(r is not None for r in runs):
                margin.update({k: v for k, v in over_splits(*runs).items() if k != "per_split"})
            rows.append(margin)
        out[ev] = pd.DataFrame(rows, columns=MARGIN_COLUMNS).set_index(["topology", "replicas"])
    return out


SPLIT_SUMMARY_COLUMNS = ["eval", "topology", "replicas", "solver", "splits", "mean", "split_low", "split_high",
                         "split_min", "split_max", "every_split"]


def split_summary(splits: pd.DataFrame, steps: StepTimes, trace: str, main_seed: int) -> pd.DataFrame:
    """Per evaluation, setting and solver of `trace` re-split (collect.split_table rows): the speedup vs contiguous
    in each split (`split_<seed>` columns), their mean, the interval over splits (resampling splits, then steps),
    min, max and whether contiguous is beaten in every split; SPLIT_SUMMARY_COLUMNS then the per-split columns.
    Cells without every split's runs are left out."""
    rows = splits[(splits["trace"] == trace) & (splits["solver"] != BASELINE)]
    seeds = sorted(rows["split_seed"].unique())
    out = []
    for (ev, topology, replicas, solver), group in rows.groupby(["eval", "topology", "replicas", "solver"]):
        base = split_step_times(steps, trace, topology, BASELINE, 0, ev, seeds, main_seed)
        ours = split_step_times(steps, trace, topology, solver, replicas, ev, seeds, main_seed)
        if base is None or ours is None:
            continue
        summary = over_splits(base, ours)
        out.append({"eval": ev, "topology": topology, "replicas": int(replicas), "solver": solver,
                    "mean": float(np.mean(summary["per_split"])),
                    **{k: v for k, v in summary.items() if k != "per_split"},
                    **{f"split_{seed}": value for seed, value in zip(seeds, summary["per_split"])}})
    columns = [*SPLIT_SUMMARY_COLUMNS, *(f"split_{seed}" for seed in seeds)]
    frame = pd.DataFrame(out, columns=columns)
    return frame.sort_values(["eval", "topology", "replicas", "solver"], key=lambda c: c.map(
        lambda v: f"{v != HELDOUT:d}{v}") if c.name == "eval" else c).reset_index(drop=True)


def eval_title(trace: str, ev: str) -> str:
    """'held-out intent' or 'law (other domain)'."""
    return f"held-out {trace}" if ev == HELDOUT else f"{ev} (other domain)"


def dispatch_tables(table: pd.DataFrame, trace: str) -> Headline:
    """Per replicated setting of `trace` scored on held-out routing ('h200_2x8 r1'): speedup vs contiguous with
    rows the engine dispatch the tokens were split with (`speedup_vs_contiguous.<dispatch>` columns of the
    results table) and one column per solver. Without replicas every dispatch is the same, so those are left out."""
    rows = table[(table["trace"] == trace) & (table["eval"] == HELDOUT) & (table["replicas"] > 0)
                 & (table["solver"] != BASELINE)]
    prefix = "speedup_vs_contiguous."
    columns = [c for c in table.columns if c.startswith(prefix)]
    out = {}
    for (topology, replicas), group in rows.groupby(["topology", "replicas"], sort=True):
        frame = group.set_index("solver")[columns].T.rename(index=lambda c: c[len(prefix):])
        order = sorted(frame.index, key=lambda d: (DISPATCHES.index(d) if d in DISPATCHES else len(DISPATCHES), d))
        frame = frame.loc[order]
        out[_setting((topology, replicas))] = frame.rename_axis(index="dispatch", columns=None).dropna(how="all")
    return out


def _labels(key: object) -> list[str]:
    """Index cells of a row: (topology, replicas) -> [topology, r<replicas>]; anything else as is."""
    return [str(key[0]), f"r{int(key[1])}"] if isinstance(key, tuple) else [str(key)]


def _cells(speedups: pd.DataFrame, bold: tuple[str, str],
           interval: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> list[list[str]]:
    """Rows of formatted cells: the index (topology, r<replicas>, or a dispatch), then each solver's speedup
    (3 decimals, the row's best wrapped in `bold`, '-' where missing), with its 95% interval
    ' (low-high)' where `interval` (low, high tables like speedups) has one."""
    out = []
    for key, row in speedups.iterrows():
        best = row.max()
        cells = _labels(key)
        for solver, value in row.items():
            if pd.isna(value):
                cells.append("-")
                continue
            text = f"{value:.3f}"
            text = f"{bold[0]}{text}{bold[1]}" if value == best else text
            if interval is not None and not pd.isna(low := interval[0].get(solver, {}).get(key, np.nan)):
                text += f" ({low:.3f}-{interval[1].loc[key, solver]:.3f})"
            cells.append(text)
        out.append(cells)
    return out


def _index_header(speedups: pd.DataFrame) -> list[str]:
    return ["topology", "replicas"] if speedups.index.nlevels == 2 else [str(speedups.index.name or "")]


def markdown_headline(speedups: pd.DataFrame, interval: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> str:
    """One headline table as GitHub Markdown, the best of each row in **bold**, intervals where given."""
    header = [*_index_header(speedups), *speedups.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(speedups, ("**", "**"), interval)]
    return "\n".join(lines)


def html_headline(speedups: pd.DataFrame, interval: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> str:
    """One headline table as HTML, the best of each row in <b>bold</b>, intervals where given."""
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in [*_index_header(speedups), *speedups.columns])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c) if '<b>' not in c else c}</td>" for c in cells) + "</tr>"
                   for cells in _cells(speedups, ("<b>", "</b>"), interval))
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def split_display(summary: pd.DataFrame, ev: str) -> pd.DataFrame:
    """One evaluation's rows of split_summary as a table to show: topology, replicas, solver, the speedup vs
    contiguous in each split (3 decimals), their mean, the 95% interval over splits and whether contiguous is
    beaten in every split."""
    rows = summary[summary["eval"] == ev]
    per_split = [c for c in summary.columns if c.startswith("split_") and c.removeprefix("split_").isdigit()]
    return pd.DataFrame({"topology": rows["topology"], "replicas": rows["replicas"].map(lambda r: f"r{int(r)}"),
                         "solver": rows["solver"],
                         **{f"split {c.removeprefix('split_')}": rows[c].map(lambda v: f"{v:.3f}") for c in per_split},
                         "mean": rows["mean"].map(lambda v: f"{v:.3f}"),
                         "95% over splits": [f"{lo:.3f}-{hi:.3f}" for lo, hi in zip(rows["split_low"],
                                                                                    rows["split_high"])],
                         "every split": rows["every_split"].map(lambda b: "yes" if b else "no")})


def headline_metrics(tables: Headline) -> dict[str, float]:
    """`speedup.<eval>.<topology>.r<replicas>.<solver>` for every cell with a number."""
    metrics = {}
    for ev, speedups in tables.items():
        for (topology, replicas), row in speedups.iterrows():
            for solver, value in row.items():
                if not pd.isna(value):
                    metrics[f"speedup.{ev}.{topology}.r{int(replicas)}.{solver}"] = float(value)
    return metrics


def headline_long(tables: Headline, trace: str) -> pd.DataFrame:
    """The headline tables as one long table: trace, eval, topology, replicas, solver, speedup, best."""
    frames = []
    for ev, speedups in tables.items():
        long = speedups.stack().rename("speedup_vs_contiguous").reset_index()
        long.columns = ["topology", "replicas", "solver", "speedup_vs_contiguous"]
        best = long.groupby(["topology", "replicas"])["speedup_vs_contiguous"].transform("max")
        frames.append(long.assign(trace=trace, eval=ev, best=long["speedup_vs_contiguous"] == best))
    columns = ["trace", "eval", "topology", "replicas", "solver", "speedup_vs_contiguous", "best"]
    return pd.concat(frames)[columns].reset_index(drop=True) if frames else pd.DataFrame(columns=columns)


def _setting(key: tuple[str, int]) -> str:
    return f"{key[0]} r{int(key[1])}"


def _count_phrase(counts: pd.Series, total: int) -> str:
    """'eplb in 2 of 3 settings and steptail in 1' (counts sorted, largest first)."""
    parts = [f"{solver} in {n}" for solver, n in counts.items()]
    parts[0] += f" of {total} settings"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _margin_phrase(key: tuple[str, int], row: pd.Series) -> str:
    text = f"{_setting(key)} (vs {row['runner_up']}: {row['low']:.3f}-{row['high']:.3f}x"
    if row.get("splits", 1) > 1:
        text += (f"; {row['split_min']:.3f}-{row['split_max']:.3f}x across {int(row['splits'])} splits, "
                 f"{row['split_low']:.3f}-{row['split_high']:.3f}x over splits")
    return text + ")"


def beaten(row: pd.Series) -> bool:
    """Whether a margin (winner_margins row) calls the winner faster: its paired interval on the main split's
    steps excludes 1.0 and, where the study re-split the trace, the runner-up is beaten in every split."""
    every = row.get("every_split", np.nan)
    return distinguishable((row["low"], row["high"])) and (pd.isna(every) or bool(every))


def verdict(row: pd.Series) -> str:
    """A margin (winner_margins row) in words: `faster` (beaten in every split), `faster in the one split` (beaten,
    where that evaluation was not re-split), `not in every split` (the main split's interval excludes 1.0 but the
    runner-up wins a re-split) or `not distinguishable` (the interval includes 1.0)."""
    if beaten(row):
        return "faster in the one split" if pd.isna(row.get("every_split", np.nan)) else "faster"
    return "not in every split" if distinguishable((row["low"], row["high"])) else "not distinguishable"


def winner_sentence(speedups: pd.DataFrame, where: str, margins: pd.DataFrame | None = None) -> str:
    """Which solver is fastest in how many settings, and the largest speedup (held-out or another domain).
    With `margins` (winner_margins of this table): which solver has the highest speedup where, and in which
    settings it is faster than the runner-up (the paired interval excludes 1.0) or not distinguishable."""
    winners = speedups.idxmax(axis=1)
    best = speedups.max(axis=1)
    top = best.idxmax()
    counts = winners.value_counts().sort_index().sort_values(ascending=False, kind="stable")
    if margins is not None and not margins.empty:
        lead = (f"On {where}, the highest speedup is {_count_phrase(counts, len(speedups))} (largest "
                f"{best[top]:.3f}x contiguous, {winners[top]} on {_setting(top)})")
        clear = [k for k, row in margins.iterrows() if beaten(row)]
        resplit = bool((margins["splits"] > 1).any()) if "splits" in margins else False
        rule = ("paired 95% bootstrap interval over the main split's scored steps excludes 1.0, and the runner-up "
                "is beaten in every re-split; the range across splits and the 95% interval over splits, resampling "
                "splits then steps, follow" if resplit else
                "paired 95% bootstrap interval over the scored steps excludes 1.0")
        parts = []
        if clear:
            parts.append(f"it is faster than the runner-up ({rule}) on "
                         + ", ".join(_margin_phrase(k, margins.loc[k]) for k in clear))
        unclear = [k for k in margins.index if k not in clear]
        if unclear:
            what = "not shown faster than" if resplit else "not distinguishable from"
            parts.append(("and " if clear else "it is ") + f"{what} the runner-up"
                         + ("" if clear or not resplit else f" ({rule})") + " on "
                         + ", ".join(_margin_phrase(k, margins.loc[k]) for k in unclear))
        return lead + "; " + " ".join(parts) + "."
    if len(speedups) == 1:
        return (f"On {where}, the fastest placement is {winners.iloc[0]}, at {best.iloc[0]:.3f}x contiguous "
                f"({_setting(best.index[0])}).")
    if len(counts) == 1:
        every = "both" if len(speedups) == 2 else f"all {len(speedups)}"
        return (f"On {where}, {counts.index[0]} is the fastest placement in {every} settings, "
                f"from {best.min():.3f}x to {best.max():.3f}x contiguous (largest on {_setting(top)}).")
    return (f"On {where}, the fastest placement is {_count_phrase(counts, len(speedups))}; the largest speedup is "
            f"{best[top]:.3f}x contiguous ({winners[top]} on {_setting(top)}).")


def spread_sentence(speedups: pd.DataFrame) -> str | None:
    """Where placement matters most and least (best speedup per setting), or None for a single setting."""
    best = speedups.max(axis=1)
    if len(best) < 2:
        return None
    if best.max() <= 1.0:
        return f"No placement beats contiguous in any setting (best {best.max():.3f}x)."
    most, least = best.idxmax(), best.idxmin()
    return (f"Placement matters most on {_setting(most)} (best {best[most]:.3f}x) and least on "
            f"{_setting(least)} (best {best[least]:.3f}x).")


def transfer_sentence(held: pd.DataFrame, other: pd.DataFrame, ev: str) -> str | None:
    """What scoring on another domain does: mean best speedup over the settings both have, how many settings
    fall to contiguous or below, and whether the winners change. None without common settings."""
    common = held.index.intersection(other.index)
    if common.empty:
        return None
    h_best, o_best = held.loc[common].max(axis=1), other.loc[common].max(axis=1)
    lost = int((o_best <= 1.0).sum())
    verb = "falls" if o_best.mean() < h_best.mean() else "rises"
    if len(common) == 1:
        text = (f"Scored on {ev}, another domain, the best speedup on {_setting(common[0])} {verb} from "
                f"{h_best.iloc[0]:.3f}x to {o_best.iloc[0]:.3f}x" + (", no faster than contiguous" if lost else ""))
    else:
        text = (f"Scored on {ev}, another domain, the best speedup per setting {verb} from {h_best.mean():.3f}x "
                f"to {o_best.mean():.3f}x on average")
        if lost:
            text += f", and {lost} of {len(common)} settings {'is' if lost == 1 else 'are'} no faster than contiguous"
    same = int((held.loc[common].idxmax(axis=1) == other.loc[common].idxmax(axis=1)).sum())
    if same < len(common):
        text += f"; the winner changes in {len(common) - same} of {len(common)}"
    return text + "."


def replica_sentence(speedups: pd.DataFrame) -> str | None:
    """What extra replicas do to the best speedup, on the first topology solved at several budgets."""
    best = speedups.max(axis=1)
    for topology in best.index.get_level_values(0).unique():
        budgets = best.loc[topology].sort_index()
        if len(budgets) >= 2:
            low, high = budgets.index[0], budgets.index[-1]
            verb = "raises" if budgets[high] > budgets[low] else "lowers"
            return (f"On {topology}, going from r{low} to r{high} replicas {verb} the best speedup from "
                    f"{budgets[low]:.3f}x to {budgets[high]:.3f}x.")
    return None


def headline_sentences(tables: Headline, trace: str, limit: int = 4, margins: Margins | None = None) -> list[str]:
    """Up to `limit` sentences from the headline tables, in reading order: who wins on held-out routing
    (or the first evaluation; with `margins`, where the win is distinguishable), where placement matters,
    what replicas do, what another domain does."""
    nonempty = {ev: t.dropna(how="all") for ev, t in tables.items() if not t.dropna(how="all").empty}
    if not nonempty:
        return []
    first = HELDOUT if HELDOUT in nonempty else next(iter(nonempty))
    main = nonempty[first]
    ranked = [(0, winner_sentence(main, eval_title(trace, first) + " routing", (margins or {}).get(first)))]
    ranked += [(1, transfer_sentence(main, other, ev)) for ev, other in nonempty.items() if ev != first]
    one_topology = main.index.get_level_values(0).nunique() == 1  # then the replica sentence says it all
    ranked += [(2, None if one_topology else spread_sentence(main)), (3, replica_sentence(main))]
    kept = sorted((r for r in ranked if r[1] is not None), key=lambda r: r[0])[:limit]
    order = {0: 0, 2: 1, 3: 2, 1: 3}  # reading order: winners, spread, replicas, other domain
    return [text for _, text in sorted(kept, key=lambda r: order[r[0]])]


def regime_sentence(regime: pd.DataFrame) -> str | None:
    """From the regime table (topology, label, step_tokens, speedup_vs_contiguous): the best speedup at the
    smallest and largest step on each topology."""
    if regime.empty:
        return None
    parts = []
    for topology, rows in regime.groupby("topology", sort=False):
        best = rows.groupby("step_tokens")["speedup_vs_contiguous"].max().sort_index()
        small, large = best.index[0], best.index[-1]
        parts.append(f"on {topology} from {best[small]:.3f}x at {small} tokens per step to "
                     f"{best[large]:.3f}x at {large}")
    text = "; ".join(parts)
    return "The best placement's speedup vs contiguous goes " + text + "."


def serve_sentence(table: pd.DataFrame) -> str | None:
    """What the served runs measured (results rows with measured_layer_time_s): only runs on shaped links,
    the error of the whole step and of the transfers alone (the part the emulation measures; the rest it
    waits out from the cost model, injected_share); runs on unshaped links are counted and left out."""
    served = table.dropna(subset=["measured_layer_time_s"])
    if served.empty:
        return None
    shaped = served[served["serve_links_shaped"].fillna(False).astype(bool)]
    left_out = len(served) - len(shaped)
    text = ""
    if not shaped.empty:
        total = shaped["measured_layer_time_s"] / served_prediction(shaped) - 1
        emulated = "emulated " if shaped.get("served_predicted_layer_time_s", pd.Series(dtype=float)).notna().any() else ""
        text = (f"Served on the {emulated}{shaped['topology'].iloc[0]} with shaped links ({len(shaped)} placements), "
                f"the measured step time is {total.min():+.1%} to {total.max():+.1%} off the prediction")
        comm = shaped["comm_rel_error"].dropna()
        if len(comm):
            share = shaped["injected_share"].dropna()
            text += (f", and {comm.min():+.1%} to {comm.max():+.1%} on the transfers alone: the emulation waits out "
                     f"{share.min():.0%}-{share.max():.0%} of the predicted time (expert compute and link latency) "
                     f"from the cost model itself, so only the transfers are measured")
        text += "."
    if left_out:
        text += (" " if text else "") + (f"{left_out} serve run{'s' if left_out > 1 else ''} on unshaped links "
                                         f"(emulation without root) {'are' if left_out > 1 else 'is'} left out.")
    return text
