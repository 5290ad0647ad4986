"""Render the tables of README.md and docs/*.md from the committed CSVs under docs/results/.

    .venv/bin/python benchmarks/render_tables.py            # rewrite every marked table in place
    .venv/bin/python benchmarks/render_tables.py --check    # exit 1 if a marked table differs from its CSV

A marked table is the block between `<!-- table: docs/results/NAME/FILE.csv -->` and `<!-- /table -->`:
it becomes a line naming the CSV and how it was made (command and date, from run.json beside the CSV,
written by the benchmark that measured it), then the CSV as a Markdown table (numbers as written,
floats to 3 decimals). Edit the CSV's benchmark, never the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table: (?P<csv>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def cell(text: str) -> str:
    """A CSV field as a table cell: floats (not ints) to 3 decimals, empty as '-'."""
    if text == "":
        return "-"
    try:
        float(text)
    except ValueError:
        return text
    return text if re.fullmatch(r"-?\d+", text) else f"{float(text):.3f}"


def render(csv_path: Path) -> str:
    """The provenance line and the Markdown table of one CSV."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    run = json.loads((csv_path.parent / "run.json").read_text())
    lines = [f"From `{csv_path.relative_to(ROOT)}`, written by `{run['command']}` on {run['date']} "
             f"({run['note']}).", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def rendered(text: str) -> str:
    """`text` with every marked table rendered from its CSV."""
    return BLOCK.sub(lambda m: m.group(1) + render(ROOT / m.group("csv")) + m.group(4), text)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args()
    stale = []
    for path in documents():
        text = path.read_text()
        new = rendered(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    for path in stale:
        print(f"{'stale' if args.check else 'rendered'}: {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
