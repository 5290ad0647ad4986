"""The report's pure parts against hand-computed answers (the whole report runs in test_workflow.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from moetuner.report.collect import ReportError, parse_run_dir, relative_gap, speedup_vs_contiguous
from moetuner.report.document import markdown_table
from moetuner.placement.layout import gpu_loads
from moetuner.profiling.stats import expert_load
from moetuner.report.figures import relative_load


def test_expert_counts_by_hand() -> None:
    ids = np.array([[[0, 1], [2, 0]],
                    [[0, 2], [2, 1]]])  # [T=2, L=2, k=2], E=3
    np.testing.assert_array_equal(expert_load(ids, 3), [[2, 1, 1], [1, 1, 2]])


def test_gpu_load_splits_replicas_evenly() -> None:
    counts = np.array([[10.0, 4.0, 2.0]])  # [L=1, E=3]
    # 2 GPUs x 2 slots: expert 0 has a replica on each GPU, so each copy takes 5 tokens.
    np.testing.assert_allclose(gpu_loads(np.array([[0, 1, 0, 2]]), counts, 2), [[9.0, 7.0]])
    # an empty slot (-1) holds nothing
    np.testing.assert_allclose(gpu_loads(np.array([[0, -1, 1, 2]]), counts, 2), [[10.0, 6.0]])


def test_gpu_load_conserves_tokens() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 100, size=(3, 8)).astype(float)
    phy2log = np.stack([rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 4)]) for _ in range(3)])  # [3, 12]
    load = gpu_loads(phy2log, counts, 4)
    assert load.shape == (3, 4)
    np.testing.assert_allclose(load.sum(-1), counts.sum(-1))
    np.testing.assert_allclose(relative_load(load).mean(-1), 1.0)


def test_relative_gap() -> None:
    assert relative_gap(10.0, 8.0) == pytest.approx(0.2)
    assert math.isnan(relative_gap(10.0, None))


def test_parse_run_dir() -> None:
    assert parse_run_dir("round_robin-r2") == ("round_robin", 2)
    with pytest.raises(ReportError, match="<solver>-r<replicas>"):
        parse_run_dir("eplb")


def test_speedup_is_against_contiguous_of_the_same_case() -> None:
    sim = pd.DataFrame({"trace": ["a", "a", "a", "a"], "topology": ["t"] * 4, "eval": ["h", "h", "o", "o"],
                        "solver": ["contiguous", "eplb", "contiguous", "eplb"], "replicas": [0, 1, 0, 1],
                        "layer_time_s": [4.0, 2.0, 3.0, 6.0]})
    np.testing.assert_allclose(speedup_vs_contiguous(sim), [1.0, 2.0, 1.0, 0.5])


def test_markdown_table() -> None:
    table = pd.DataFrame({"solver": ["eplb"], "time": [0.123456], "gap": [float("nan")]})
    assert markdown_table(table).splitlines() == ["| solver | time | gap |", "|---|---|---|", "| eplb | 0.1235 | - |"]
