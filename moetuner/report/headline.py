"""The report's headline: per evaluation, a topology x replicas by solver table of speedups vs contiguous,
the best of each row in bold, and a few sentences generated from those numbers.

All functions are pure (tables in, tables/text out); `collect.results_table` gives their input.
"""

from __future__ import annotations

import html

import pandas as pd

from moetuner.costmodel.settings import DISPATCHES

HELDOUT = "heldout"
BASELINE = "contiguous"
Headline = dict[str, pd.DataFrame]
"""eval name -> speedup table: index (topology, replicas), columns solvers, NaN where not solved."""


def headline_trace(table: pd.DataFrame) -> str:
    """The trace the headline is about: among traces scored on another domain (else all), the one with the
    most results rows; ties by name."""
    transferred = table.loc[table["eval"] != HELDOUT, "trace"].unique()
    pool = table[table["trace"].isin(transferred)] if len(transferred) else table
    sizes = pool.groupby("trace").size()
    return str(sorted(sizes.index, key=lambda t: (-sizes[t], t))[0])


def headline_tables(table: pd.DataFrame, trace: str) -> Headline:
    """Per evaluation of `trace` (held-out first, then other domains by name): speedup vs contiguous with
    rows (topology, replicas) and one column per solver except contiguous itself."""
    rows = table[(table["trace"] == trace) & (table["solver"] != BASELINE)]
    evals = sorted(rows["eval"].unique(), key=lambda e: (e != HELDOUT, e))
    return {ev: rows[rows["eval"] == ev].pivot_table(index=["topology", "replicas"], columns="solver",
                                                       values="speedup_vs_contiguous", aggfunc="first")
            .rename_axis(columns=None).sort_index()
            for ev in evals}


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


def _cells(speedups: pd.DataFrame, bold: tuple[str, str]) -> list[list[str]]:
    """Rows of formatted cells: the index (topology, r<replicas>, or a dispatch), then each solver's speedup
    (3 decimals, the row's best wrapped in `bold`, '-' where missing)."""
    out = []
    for key, row in speedups.iterrows():
        best = row.max()
        cells = _labels(key)
        for value in row:
            if pd.isna(value):
                cells.append("-")
            else:
                text = f"{value:.3f}"
                cells.append(f"{bold[0]}{text}{bold[1]}" if value == best else text)
        out.append(cells)
    return out


def _index_header(speedups: pd.DataFrame) -> list[str]:
    return ["topology", "replicas"] if speedups.index.nlevels == 2 else [str(speedups.index.name or "")]


def markdown_headline(speedups: pd.DataFrame) -> str:
    """One headline table as GitHub Markdown, the best of each row in **bold**."""
    header = [*_index_header(speedups), *speedups.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(speedups, ("**", "**"))]
    return "\n".join(lines)


def html_headline(speedups: pd.DataFrame) -> str:
    """One headline table as HTML, the best of each row in <b>bold</b>."""
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in [*_index_header(speedups), *speedups.columns])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                   for cells in _cells(speedups.rename(index=lambda v: html.escape(str(v))), ("<b>", "</b>")))
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


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


def winner_sentence(speedups: pd.DataFrame, where: str) -> str:
    """Which solver is fastest in how many settings, and the largest speedup (held-out or another domain)."""
    winners = speedups.idxmax(axis=1)
    best = speedups.max(axis=1)
    top = best.idxmax()
    counts = winners.value_counts().sort_index().sort_values(ascending=False, kind="stable")
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


def headline_sentences(tables: Headline, trace: str, limit: int = 4) -> list[str]:
    """Up to `limit` sentences from the headline tables, in reading order: who wins on held-out routing
    (or the first evaluation), where placement matters, what replicas do, what another domain does."""
    nonempty = {ev: t.dropna(how="all") for ev, t in tables.items() if not t.dropna(how="all").empty}
    if not nonempty:
        return []
    first = HELDOUT if HELDOUT in nonempty else next(iter(nonempty))
    main = nonempty[first]
    ranked = [(0, winner_sentence(main, eval_title(trace, first) + " routing"))]
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
