"""The report's phases section: a deployment's prefill and decode placements, each scored on its own unit.

Reads every run of the study's `phases` section (moetuner.study.targets.LAYOUT["phase_simulate"]:
`<results>/phases/<trace>/<deployment>/<solver>/<phase>/<eval>/metrics.json`, written by moetuner-simulate
with the unit's topology and phase) into one table per phase: each solver's MoE time per step, its speedup
over the reference rival (EPLB where the study ran it) with the paired bootstrap interval over the scored
steps, and its gap to the fixed-placement lower bound where a run of the phase computed it (`bound=true`:
the bound depends only on the scored steps, the unit's topology and slots per GPU, so the study computes it
once per phase and it is divided into every solver's time here).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from moetuner.costmodel.intervals import distinguishable, speedup_interval
from moetuner.report.collect import gap_to_bound
from moetuner.phase import PHASES
from moetuner.report.document import Section, html_table, markdown_table
from moetuner.study.targets import find_files

COLUMNS = ["trace", "deployment", "phase", "eval", "topology", "tokens_per_rank", "dataflow", "solver",
           "step_time_ms", "reference", "vs_reference", "vs_reference_low", "vs_reference_high", "gap_to_bound"]
REFERENCE = "eplb"
"""The rival every placement of a phase is compared with where the study ran it (else the first solver)."""


def phase_runs(results: str | Path) -> pd.DataFrame:
    """One row per phase simulate run: the layout's fields, the setting scored, the time per step (ms), the
    gap to its phase's lower bound (collect.gap_to_bound: one run of the phase computed it) and `steps`
    (seconds per scored step, [S])."""
    rows = []
    for path, key in find_files(results, "phase_simulate"):
        doc = json.loads(path.read_text())
        rows.append({"trace": key["trace"], "deployment": key["deployment"], "phase": key["phase"],
                     "eval": key["evaluate_on"], "topology": doc["topology"],
                     "tokens_per_rank": doc["step_tokens"] // doc["num_gpus"], "dataflow": doc["dataflow"],
                     "solver": key["solver"], "step_time_ms": 1e3 * doc["layer_time_s"],
                     "layer_time_s": doc["layer_time_s"], "bound_step_s": doc.get("bound_step_s", np.nan),
                     "steps": np.asarray(doc["step_times_s"], dtype=float)})
    runs = pd.DataFrame(rows, columns=[*COLUMNS[:9], "layer_time_s", "bound_step_s", "steps"])
    gap = gap_to_bound(runs, ("trace", "deployment", "phase", "eval")) if len(runs) else []
    return runs.assign(gap_to_bound=gap).drop(columns=["layer_time_s", "bound_step_s"])


def phase_table(results: str | Path) -> pd.DataFrame:
    """COLUMNS, one row per phase run, prefill before decode, each phase's solvers fastest first; `vs_reference` the reference
    rival's time per step over the solver's (above 1: faster than it), with its paired 95% interval over the
    same scored steps; `gap_to_bound` the time over the phase's lower bound (NaN where no run computed one).
    Empty (with COLUMNS) when the study has no `phases` section."""
    runs = phase_runs(results)
    runs = runs.assign(order=[PHASES.index(p) if p in PHASES else len(PHASES) for p in runs["phase"]])
    rows = []
    for _, group in runs.groupby(["trace", "deployment", "order", "phase", "eval"], sort=True):
        solvers = list(group["solver"])
        reference = REFERENCE if REFERENCE in solvers else sorted(solvers)[0]
        base = group.loc[group["solver"] == reference, "steps"].iloc[0]
        for _, run in group.sort_values(["step_time_ms", "solver"]).iterrows():
            low, high = speedup_interval(base, run["steps"])
            rows.append({**run.drop(["steps", "order"]).to_dict(), "reference": reference,
                         "vs_reference": float(np.mean(base) / np.mean(run["steps"])),
                         "vs_reference_low": low, "vs_reference_high": high})
    return pd.DataFrame(rows, columns=COLUMNS)


def phase_sentence(group: pd.DataFrame) -> str:
    """What one phase's table says: the fastest placement against the reference rival and the runner-up,
    whether the interval tells them apart, and how far the fastest is from the bound."""
    first, where = group.iloc[0], (f"{group['phase'].iloc[0]} on {group['topology'].iloc[0]} "
                                   f"({group['tokens_per_rank'].iloc[0]} tokens per rank, {group['dataflow'].iloc[0]})")
    if len(group) == 1:
        return f"At {where} only {first.solver} was placed."
    runner = group.iloc[1]
    if first.solver == first.reference:  # the reference wins: how far behind the runner-up is
        apart = distinguishable((runner.vs_reference_low, runner.vs_reference_high))
        text = (f"At {where} the fastest placement is {first.solver} (the reference); runner-up {runner.solver} at "
                f"{runner.vs_reference:.3f}x its speed [{runner.vs_reference_low:.3f}, {runner.vs_reference_high:.3f}]")
    else:
        apart = distinguishable((first.vs_reference_low, first.vs_reference_high))
        text = (f"At {where} the fastest placement is {first.solver}: {first.vs_reference:.3f}x {first.reference}'s "
                f"speed [{first.vs_reference_low:.3f}, {first.vs_reference_high:.3f}]; runner-up {runner.solver} "
                f"({runner.vs_reference:.3f}x)")
    text += ("; the interval over the scored steps excludes 1." if apart else
             "; a tie: the interval over the scored steps holds 1.")
    if not np.isnan(first.gap_to_bound):
        text += f" It is {first.gap_to_bound:.2f}x the fixed-placement lower bound."
    return text


def phase_groups(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) of each phase setting of the table, in its order (prefill first)."""
    return [(f"{phase}: {trace} on deployment {deployment}, scored on {ev}", group.reset_index(drop=True))
            for (trace, deployment, phase, ev), group in table.groupby(["trace", "deployment", "phase", "eval"],
                                                                        sort=False)]


def phase_sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per phase setting (phase_sentence), for the report's headline."""
    return [phase_sentence(group) for _, group in phase_groups(table)]


def phase_section(table: pd.DataFrame) -> Section | None:
    """The section: a sentence and a table per phase setting, or None when the table is empty."""
    if table.empty:
        return None
    md, page = [], []
    for title, group in phase_groups(table):
        sentence = phase_sentence(group)
        shown = group.drop(columns=["trace", "deployment", "phase", "eval"])
        md += [f"### {title}", "", sentence, "", markdown_table(shown), ""]
        page += [f"<h3>{html.escape(title)}</h3>", f"<p>{html.escape(sentence)}</p>", html_table(shown)]
    intro = ("Each phase placed for its own unit of the deployment (conf/deployment/) and scored on that unit's "
             "phase steps (moetuner/phase.py): prefill steps hold whole sequences, decode steps draw tokens across "
             "sequences (with the shipped traces' few sequences, requests recur). One split, no re-splits.")
    return Section("Phases: prefill and decode", "\n".join([intro, "", *md]),
                   "\n".join([f"<p>{html.escape(intro)}</p>", *page]))
