"""Result tables shared by the benchmark scripts: Markdown for the terminal/README, CSV on disk."""

from __future__ import annotations

import csv
from pathlib import Path

from moetuner.atomic import atomic_path


def markdown(rows: list[dict], columns: list[str], float_format: str = ".3g") -> str:
    """The rows as a Markdown table (floats with `float_format`, '-' for None)."""
    def cell(v: object) -> str:
        return "-" if v is None else format(v, float_format) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """Write the rows as CSV atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
