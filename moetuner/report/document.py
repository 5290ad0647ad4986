"""The standalone report: Markdown (figures beside it) and HTML (figures embedded), same content.

A document is a title, header notes and a list of `Section`s, each with its own Markdown and HTML body
and its figures. Any module can add a section (build.py assembles the list).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from moetuner.atomic import write_text_atomic

CAPTIONS = {
    "regime": "Speedup vs contiguous of each placement against tokens per step (simulator, held-out routing; "
              "steps larger than the held-out split repeat its tokens). Experts are memory-bound at small "
              "steps, so placement matters little there.",
    "load_heatmap": "Per-layer GPU load (tokens / layer mean) on held-out routing, contiguous placement (before) "
                    "and the fastest placement (after).",
    "gpu_load_box": "Spread of per-GPU token load in each layer, before and after placement.",
    "a2a_tail": "All-to-all tail (scatter + combine of the slowest GPU) per layer, every placement of the case.",
    "predicted_vs_measured": "Simulator's predicted layer time against the served (measured) one on the "
                             "emulated cluster.",
    "solve_time": "Solve time against problem size (layers x experts x GPUs).",
}


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class Section:
    """One titled part of the report: the same content as Markdown and as HTML, then its figures."""

    title: str
    markdown: str = ""
    html: str = ""
    figures: Sequence[Figure] = field(default_factory=tuple)


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


def html_table(table: pd.DataFrame) -> str:
    return table.map(format_cell).to_html(index=False, escape=True)


def figure_section(name: str, path: Path) -> Section:
    """A section holding one figure of CAPTIONS."""
    return Section(name.replace("_", " "), figures=(Figure(path, CAPTIONS[name]),))


def table_section(title: str, intro: str, table: pd.DataFrame) -> Section:
    """A section holding a sentence and a full table."""
    return Section(title, f"{intro}\n\n{markdown_table(table)}", f"<p>{html.escape(intro)}</p>{html_table(table)}")


def render_markdown(title: str, notes: Sequence[str], sections: Sequence[Section]) -> str:
    """report.md: title, notes, then every section (figures as relative links, captions below)."""
    parts = [f"# {title}", "", *(f"- {note}" for note in notes), ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        if section.markdown:
            parts += [section.markdown, ""]
        for fig in section.figures:
            parts += [f"![{fig.path.stem}]({fig.path.name})", "", fig.caption, ""]
    return "\n".join(parts)


def embedded_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}" style="max-width:100%">'


def render_html(title: str, notes: Sequence[str], sections: Sequence[Section]) -> str:
    """report.html: one self-contained page (figures as data URIs)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "td{text-align:right}td:first-child{text-align:left}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    for section in sections:
        parts += [f"<h2>{html.escape(section.title)}</h2>", section.html]
        for fig in section.figures:
            parts += [embedded_image(fig.path), f"<p>{html.escape(fig.caption)}</p>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_markdown(path: Path, title: str, notes: Sequence[str], sections: Sequence[Section]) -> Path:
    return write_text_atomic(path, render_markdown(title, notes, sections))


def write_html(path: Path, title: str, notes: Sequence[str], sections: Sequence[Section]) -> Path:
    return write_text_atomic(path, render_html(title, notes, sections))
