"""Text sources and batch planning: documents, sequence ids, token budgets, limits."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from moetuner.extraction.extract import ExtractSpec, plan_batches
from moetuner.extraction.text import TextSourceError, documents, source_label, stdlib_docstrings


def test_txt_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("first line\nsame doc\n\n\n   \n\nsecond\n\nthird")
    assert list(documents(str(path))) == [(0, "first line\nsame doc"), (1, "second"), (2, "third")]


def test_jsonl_empty_documents_keep_their_index(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in ["a b", "", "c"]) + "\n")
    assert list(documents(str(path), text_field="body")) == [(0, "a b"), (2, "c")]
    with pytest.raises(TextSourceError, match="no field 'text'.*body"):
        list(documents(str(path)))


def test_missing_text_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TextSourceError, match="does not exist"):
        documents(str(tmp_path / "none.txt"))


def test_hf_dataset_from_local_folder(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"content": f"doc {i}"}) for i in range(3)))
    assert list(documents(str(tmp_path), split="train", text_field="content")) == [
        (0, "doc 0"), (1, "doc 1"), (2, "doc 2")]
    with pytest.raises(TextSourceError, match="no column 'text'"):
        list(documents(str(tmp_path), split="train"))
    assert source_label(str(tmp_path), "train") == f"{tmp_path}:train"
    assert source_label("stdlib-docs", "train") == "stdlib-docs"


def test_stdlib_docs_are_real_text_in_fixed_order() -> None:
    first = list(islice(documents("stdlib-docs"), 20))
    assert first == list(islice(documents("stdlib-docs"), 20))
    assert [i for i, _ in first] == list(range(20))
    assert all(len(text) >= 64 and " " in text for _, text in first)
    assert len(set(islice(stdlib_docstrings(), 50))) > 40


def test_plan_batches_token_budget_by_hand() -> None:
    """Lengths 3, 5, 2, 4 with budget 10: [3, 5] pads to 2 x 5; adding 2 would be 3 x 5 > 10."""
    docs = [(i, "x" * n) for i, n in enumerate([3, 5, 2, 4])]
    batches = list(plan_batches(docs, lambda text: list(range(len(text))), ExtractSpec(token_budget=10)))
    assert [b.seq_ids for b in batches] == [[0, 1], [2, 3]]
    assert [b.index for b in batches] == [0, 1] and [b.num_tokens for b in batches] == [8, 6]


def test_plan_batches_limits_and_truncation() -> None:
    docs = [(i, "x" * n) for i, n in enumerate([3, 9, 0, 4, 4])]
    tokenize = lambda text: list(range(len(text)))  # noqa: E731
    plan = lambda **kw: list(plan_batches(docs, tokenize, ExtractSpec(token_budget=1, **kw)))  # noqa: E731
    assert [b.input_ids for b in plan(seq_len=4, max_tokens=7)] == [[[0, 1, 2]], [[0, 1, 2, 3]]]
    assert [b.seq_ids for b in plan(max_sequences=3)] == [[0], [1], [3]]  # the empty document is skipped
