"""Text sources: documents in a fixed order, each with its index in the source (its sequence id).

* `stdlib-docs`: docstrings of the Python standard library, parsed (never imported) from its
  source files in sorted order; real text on every machine, no download.
* a local `.txt` file (one document per blank-line-separated paragraph) or `.jsonl` file (one
  document per line, field `text_field`);
* anything else: a Hugging Face dataset name or local folder for `datasets.load_dataset`.
"""

from __future__ import annotations

import ast
import itertools
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

STDLIB_DOCS = "stdlib-docs"
MIN_DOC_CHARS = 64
SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class TextSourceError(ValueError):
    """A text source cannot be read; the message names the source and the fix."""


def _sorted_py_files(folder: Path) -> Iterator[Path]:
    """.py files below `folder` in sorted path order, walked lazily; skips tests and site-packages."""
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name not in SKIPPED_STDLIB_DIRS:
            yield from _sorted_py_files(entry)
        elif entry.suffix == ".py" and entry.is_file():
            yield entry


def stdlib_docstrings(min_chars: int = MIN_DOC_CHARS) -> Iterator[str]:
    """Docstrings (module, class, function) of the standard library's .py files, sorted by path."""
    for path in _sorted_py_files(Path(sysconfig.get_paths()["stdlib"])):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def txt_documents(path: Path) -> Iterator[str]:
    """Blank-line-separated paragraphs of a text file."""
    paragraph: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in itertools.chain(f, [""]):
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []


def jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """The `text_field` of each JSON line."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise TextSourceError(f"{path}:{number}: no field {text_field!r} (fields: {sorted(record)}); "
                                      f"set dataset.text_field to the field holding the text")
            yield str(record[text_field])


def hf_documents(source: str, split: str, text_field: str, config_name: str | None) -> Iterator[str]:
    """The `text_field` column of a Hugging Face dataset (hub name or local folder)."""
    import datasets

    try:
        data = datasets.load_dataset(source, config_name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot read"
        raise TextSourceError(f"dataset {source!r} (config {config_name!r}, split {split!r}) cannot be "
                              f"loaded: {err}. Use a local .txt/.jsonl file, a folder for "
                              f"datasets.load_dataset, '{STDLIB_DOCS}', or a preset in "
                              f"conf/presets/dataset/") from err
    if text_field not in data.column_names:
        raise TextSourceError(f"dataset {source!r} has no column {text_field!r} (columns: "
                              f"{data.column_names}); set dataset.text_field")
    for row in data:
        yield str(row[text_field])


def _is_local_text(source: str) -> bool:
    return source == STDLIB_DOCS or Path(source).suffix in (".txt", ".jsonl")


def source_label(source: str, split: str) -> str:
    """The trace's `source` metadata: the source, plus `:split` for a Hugging Face dataset."""
    return source if _is_local_text(source) else f"{source}:{split}"


def documents(source: str, split: str = "train", text_field: str = "text",
              config_name: str | None = None) -> Iterator[tuple[int, str]]:
    """(sequence id, text) for each non-empty document of `source`, in source order.

    The sequence id is the document's index in the source, so ids stay comparable across runs
    with different limits; empty documents are skipped but keep their index.
    """
    path = Path(source)
    if source == STDLIB_DOCS:
        docs: Iterator[str] = stdlib_docstrings()
    elif path.suffix == ".txt" and path.is_file():
        docs = txt_documents(path)
    elif path.suffix == ".jsonl" and path.is_file():
        docs = jsonl_documents(path, text_field)
    elif path.suffix in (".txt", ".jsonl"):
        raise TextSourceError(f"text file {source} does not exist")
    else:
        docs = hf_documents(source, split, text_field, config_name)
    return ((i, text) for i, text in enumerate(docs) if text.strip())
