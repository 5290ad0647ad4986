"""The standalone report: Markdown (figures beside it) and HTML (figures embedded), same content."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from moetuner.atomic import write_text_atomic

CAPTIONS = {
    "load_heatmap": "Per-layer GPU load (tokens / layer mean) on held-out routing, contiguous placement (before) "
                    "and the fastest placement (after).",
    "gpu_load_box": "Spread of per-GPU token load in each layer, before and after placement.",
    "a2a_tail": "All-to-all tail (dispatch + combine of the slowest GPU) per layer, every placement of the case.",
    "predicted_vs_measured": "Simulator's predicted layer time against the served (measured) one on the "
                             "emulated cluster.",
    "solve_time": "Solve time against problem size (layers x experts x GPUs).",
}


def format_cell(value: object) -> str:
    """Numbers to 4 significant digits, NaN/None to '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def notes_list(notes: Sequence[str]) -> list[str]:
    return [f"- {note}" for note in notes]


def write_markdown(path: Path, title: str, table: pd.DataFrame, figures: Mapping[str, Path],
                   notes: Sequence[str]) -> Path:
    """report.md: notes, the results table, then each figure (relative link) with its caption."""
    parts = [f"# {title}", "", *notes_list(notes), "", "## Results", "", markdown_table(table), ""]
    for name, fig in figures.items():
        parts += [f"## {name.replace('_', ' ')}", "", f"![{name}]({fig.name})", "", CAPTIONS[name], ""]
    return write_text_atomic(path, "\n".join(parts))


def embedded_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}" style="max-width:100%">'


def write_html(path: Path, title: str, table: pd.DataFrame, figures: Mapping[str, Path], notes: Sequence[str]) -> Path:
    """report.html: one self-contained file (figures as data URIs)."""
    cells = table.map(format_cell)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>",
             "<h2>Results</h2>", cells.to_html(index=False, escape=True)]
    for name, fig in figures.items():
        parts += [f"<h2>{name.replace('_', ' ')}</h2>", embedded_image(fig), f"<p>{html.escape(CAPTIONS[name])}</p>"]
    parts.append("</body></html>")
    return write_text_atomic(path, "\n".join(parts))
