"""The real routing shipped in data/esft/: its documented shapes and hashes, and that it is what the
importer makes from the raw ESFT dump (where ../shared/data exists)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import shared_data_path
from moetuner import PROJECT_ROOT
from moetuner.importers import import_routing
from moetuner.trace import load_trace

DATA = PROJECT_ROOT / "data"
# task -> (tokens, sequences), from ../shared/data/README.md (ESFT intent and law)
SHIPPED = {"intent": (8222, 127), "law": (8327, 33)}
MAX_TOTAL_BYTES = 12_000_000


def documented_files() -> dict[str, tuple[int, str]]:
    """{task: (bytes, sha256)} from the table in data/README.md."""
    rows = re.findall(r"^\| `esft/(\w+)\.safetensors` \| ([\d,]+) \|.*`([0-9a-f]{64})` \|$",
                      (DATA / "README.md").read_text(), flags=re.M)
    return {task: (int(size.replace(",", "")), sha) for task, size, sha in rows}


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_trace_has_documented_shape(task: str) -> None:
    tokens, sequences = SHIPPED[task]
    trace = load_trace(DATA / "esft" / f"{task}.safetensors")
    assert trace.topk_ids.shape == (tokens, 26, 6) and trace.topk_ids.dtype == np.int16
    assert trace.topk_weights is not None and trace.topk_weights.shape == (tokens, 26, 6)
    assert trace.topk_weights.dtype == np.float16
    assert len(trace.sequences) == sequences and trace.num_experts == 64
    assert trace.moe_layers == list(range(1, 27)) and trace.model == "deepseek-ai/DeepSeek-V2-Lite"
    assert trace.extra["dataset"] == task and trace.extra["num_hidden_layers"] == "27"  # V2-Lite: layer 0 dense
    # top-6 of a softmax over 64 experts: six distinct experts, weights (4 decimals in the dump, so
    # some round to 0) in [0, 1] with a positive sum of at most 1
    assert (np.diff(np.sort(trace.topk_ids, axis=-1), axis=-1) > 0).all()
    weights = trace.topk_weights.astype(np.float32)
    assert (weights >= 0).all() and (weights.sum(-1) > 0).all() and (weights.sum(-1) <= 1 + 1e-3).all()
    # each sequence's tokens are contiguous, sequences numbered 0..S-1 in order
    assert (np.diff(trace.seq_ids) >= 0).all() and trace.seq_ids[-1] == sequences - 1


def test_shipped_files_match_readme_and_size_limit() -> None:
    documented = documented_files()
    assert set(documented) == set(SHIPPED), "data/README.md must list every shipped file"
    total = 0
    for task, (size, sha) in documented.items():
        path = DATA / "esft" / f"{task}.safetensors"
        assert path.stat().st_size == size, f"{path}: size differs from data/README.md"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"{path}: sha256 differs from data/README.md"
        total += size
    assert total < MAX_TOTAL_BYTES


def test_shipped_files_are_not_git_ignored() -> None:
    if not (PROJECT_ROOT / ".git").exists():
        pytest.skip(f"{PROJECT_ROOT} is not a git checkout")
    paths = [str(DATA / "esft" / f"{task}.safetensors") for task in SHIPPED] + [str(DATA / "README.md")]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 1, f"git ignores: {done.stdout}"  # 1: none of the paths is ignored


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_trace_is_the_import_of_the_raw_dump(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_data_path("esft-deepseek-v2-lite", task)  # skips where ../shared/data is absent
    monkeypatch.chdir(PROJECT_ROOT)  # data/README.md's command runs from the root; `source` records the path
    fresh = import_routing("esft", os.path.join("..", "shared", "data", "esft-deepseek-v2-lite", task))
    fresh = fresh.with_weights("float16")
    shipped = load_trace(DATA / "esft" / f"{task}.safetensors")
    assert shipped.metadata() == fresh.metadata()
    for name in ("topk_ids", "seq_ids", "topk_weights"):
        a, b = getattr(shipped, name), getattr(fresh, name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
