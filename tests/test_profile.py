"""Profile statistics against hand-computed small cases, a brute-force count, and file round trips."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np
import pytest

from moetuner.profiling.stats import (ProfileError, compute_profile, follow_rate, imbalance, independent_follow_rate,
                                      load_profile, normalised_entropy, save_profile, summarize)
from moetuner.trace import Trace

# 3 tokens, 2 layers, 4 experts, top-2
HAND = np.array([[[0, 1], [2, 3]],
                 [[0, 2], [1, 0]],
                 [[1, 0], [3, 2]]], dtype=np.int16)


def make_trace(ids: np.ndarray, num_experts: int = 4, seq_ids: np.ndarray | None = None) -> Trace:
    seqs = np.arange(len(ids), dtype=np.int32) if seq_ids is None else seq_ids
    return Trace(topk_ids=ids, seq_ids=seqs, model="tiny", num_experts=num_experts,
                 moe_layers=list(range(ids.shape[1])), source="hand", hidden_size=8, moe_intermediate_size=4)


def test_hand_computed_statistics() -> None:
    p = compute_profile(make_trace(HAND), step_tokens=2)
    assert p.load.tolist() == [[3, 2, 1, 0], [1, 1, 2, 2]]
    # k*k = 4 pairs per token: t0 (0,2)(0,3)(1,2)(1,3); t1 (0,1)(0,0)(2,1)(2,0); t2 (1,3)(1,2)(0,3)(0,2)
    assert p.transitions.tolist() == [[[1, 1, 2, 2], [0, 0, 2, 2], [1, 1, 0, 0], [0, 0, 0, 0]]]
    # pairs of distinct experts of one token: layer 0 {0,1} twice, {0,2} once; layer 1 {2,3} twice, {0,1} once
    assert p.coactivation.tolist() == [
        [[0, 2, 1, 0], [2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 2], [0, 0, 2, 0]],
    ]
    assert p.step_load.tolist() == [[[2, 1, 1, 0], [1, 1, 1, 1]]]  # one full step of tokens 0, 1; token 2 left out
    summary = summarize(p)
    np.testing.assert_allclose(summary["per_layer"]["imbalance"], [3 / 1.5, 2 / 1.5])
    np.testing.assert_allclose(summary["per_layer"]["affinity"], [5 / 6])  # row maxima 2+2+1+0 over 6 routings
    np.testing.assert_allclose(summary["per_layer"]["affinity_baseline"], [2 / 3])  # 2 of 3 tokens pick expert 2
    assert summary["metrics"]["mean_step_imbalance"] == 1.5 and summary["metrics"]["num_steps"] == 1


def test_entropy_and_imbalance_extremes() -> None:
    np.testing.assert_allclose(normalised_entropy(np.array([[5, 5, 5, 5], [7, 0, 0, 0]])), [1.0, 0.0])
    np.testing.assert_allclose(imbalance(np.array([[5, 5, 5, 5], [8, 0, 0, 0], [0, 0, 0, 0]])), [1.0, 4.0, 1.0])


def test_counts_equal_a_brute_force_loop() -> None:
    rng = np.random.default_rng(3)
    T, L, E, k = 40, 3, 6, 3
    ids = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(T)]).astype(np.int16)
    p = compute_profile(make_trace(ids, E), step_tokens=7)
    load, trans, coact, steps = np.zeros((L, E)), np.zeros((L - 1, E, E)), np.zeros((L, E, E)), np.zeros((5, L, E))
    for t, l in product(range(T), range(L)):
        for a in ids[t, l]:
            load[l, a] += 1
            if t < 35:
                steps[t // 7, l, a] += 1
            for b in ids[t, l]:
                coact[l, a, b] += a != b
            if l < L - 1:
                for b in ids[t, l + 1]:
                    trans[l, a, b] += 1
    for got, want in [(p.load, load), (p.transitions, trans), (p.coactivation, coact), (p.step_load, steps)]:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(p.coactivation, p.coactivation.transpose(0, 2, 1))
    assert (np.diagonal(p.coactivation, axis1=1, axis2=2) == 0).all()
    np.testing.assert_allclose(follow_rate(p.transitions, p.load),
                               [sum(trans[l, a].max() for a in range(E)) / (T * k) for l in range(L - 1)])
    np.testing.assert_allclose(independent_follow_rate(p.load, k), load[1:].max(axis=1) / T)


def test_step_larger_than_the_trace_is_refused() -> None:
    with pytest.raises(ProfileError, match="step_tokens=4 exceeds the trace's 3 tokens"):
        compute_profile(make_trace(HAND), step_tokens=4)


def test_profile_file_round_trip(tmp_path: Path) -> None:
    p = compute_profile(make_trace(HAND, seq_ids=np.array([0, 0, 1], dtype=np.int32)), step_tokens=1)
    back = load_profile(save_profile(p, tmp_path / "profile.npz"))
    for name in ("load", "transitions", "coactivation", "step_load"):
        np.testing.assert_array_equal(getattr(back, name), getattr(p, name))
    assert (back.step_tokens, back.top_k, back.num_tokens, back.num_sequences) == (1, 2, 3, 2)
    assert back.meta == {"model": "tiny", "source": "hand", "moe_layers": [0, 1], "dataset": ""}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["profile.npz"]


def test_unreadable_profile_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="moetuner-profile trace="):
        load_profile(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ProfileError, match="bad.npz: not a readable moetuner profile"):
        load_profile(tmp_path / "bad.npz")
