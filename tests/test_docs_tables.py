"""Tables of numbers in README.md and docs/ are rendered from committed CSVs (benchmarks/render_tables.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moetuner import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import render_tables  # noqa: E402


def test_every_marked_table_is_its_csv() -> None:
    blocks = 0
    for path in render_tables.documents():
        text = path.read_text()
        blocks += len(render_tables.BLOCK.findall(text))
        assert render_tables.rendered(text) == text, (
            f"{path.name}: a marked table differs from its CSV; run benchmarks/render_tables.py")
    assert blocks >= 3  # the placement-quality tables and README's headline


def test_render_by_hand(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(render_tables, "ROOT", tmp_path)
    folder = tmp_path / "docs" / "results" / "x"
    folder.mkdir(parents=True)
    (folder / "t.csv").write_text("name,n,speedup,note\neplb,3,1.23456,\n")
    (folder / "run.json").write_text(json.dumps({"command": "python b.py", "date": "2026-12-03", "note": "quiet"}))
    doc = "before\n<!-- table: docs/results/x/t.csv -->\nold\n<!-- /table -->\nafter\n"
    assert render_tables.rendered(doc) == (
        "before\n<!-- table: docs/results/x/t.csv -->\n"
        "From `docs/results/x/t.csv`, written by `python b.py` on 2026-12-03 (quiet).\n\n"
        "| name | n | speedup | note |\n|---|---|---|---|\n| eplb | 3 | 1.235 | - |\n"
        "<!-- /table -->\nafter\n")
