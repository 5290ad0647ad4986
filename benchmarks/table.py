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


def write_run_record(folder: Path, command: str, note: str) -> Path:
    """folder/run.json: the command that wrote the CSVs beside it, today's date and a note on the run
    (size, wall time, machine), read by render_tables.py for the line above each rendered table."""
    import datetime

    from moetuner.atomic import write_json_atomic

    return write_json_atomic(Path(folder) / "run.json", {"command": command, "date": datetime.date.today().isoformat(),
                                                        "note": note})


def command_line(script: str, argv: list[str]) -> str:
    """`python benchmarks/<script> <args>` as run, without `--note TEXT` (the note is recorded on its own)."""
    import shlex

    args, skip = [], False
    for arg in argv:
        if skip or arg == "--note":
            skip = arg == "--note"
            continue
        if not arg.startswith("--note="):
            args.append(arg)
    return " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, args)])
