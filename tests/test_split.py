"""Splitting a trace by sequence: disjoint sequences, every token kept, seeded; the moetuner-split app."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moetuner.apps.split import main as split_main
from moetuner.synth import SynthSpec, synthesize
from moetuner.trace import TraceError, load_trace, save_trace, split_by_sequence

TRACE = synthesize(SynthSpec(num_tokens=1000, num_layers=2, num_experts=16, top_k=2, group_size=4, seq_len=37))


def rows(trace) -> set[tuple[int, ...]]:
    """Every token as (sequence, position within the sequence, ids...)."""
    positions = np.concatenate([np.arange(n) for n in np.unique(trace.seq_ids, return_counts=True)[1]])
    order = np.argsort(trace.seq_ids, kind="stable")
    return {(int(s), int(p), *map(int, ids.ravel())) for s, p, ids in
            zip(trace.seq_ids[order], positions, trace.topk_ids[order])}


def test_split_is_disjoint_covers_every_token_and_follows_the_fraction() -> None:
    profile, heldout = split_by_sequence(TRACE, holdout_fraction=0.25, seed=0)
    assert not set(profile.seq_ids.tolist()) & set(heldout.seq_ids.tolist())
    assert rows(profile) | rows(heldout) == rows(TRACE) and profile.num_tokens + heldout.num_tokens == 1000
    assert len(heldout.sequences) == round(0.25 * 28)  # 1000 tokens in sequences of 37: 28 sequences
    assert profile.source.endswith(":profile") and heldout.model == TRACE.model


def test_split_is_seeded() -> None:
    same = [split_by_sequence(TRACE, 0.25, seed=s)[1].sequences.tolist() for s in (4, 4, 5)]
    assert same[0] == same[1] != same[2]


def test_one_sequence_cannot_be_split() -> None:
    one = TRACE.select_sequences(np.array([0]))
    with pytest.raises(TraceError, match="needs at least 2"):
        split_by_sequence(one, 0.5)


def test_split_app_writes_both_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save_trace(TRACE, tmp_path / "t.safetensors")
    monkeypatch.setattr(sys, "argv", ["moetuner-split", f"trace={src}", f"out={tmp_path / 'split'}",
                                      "holdout_fraction=0.5", "seed=3", "mlflow=off"])
    split_main()
    profile, heldout = (load_trace(tmp_path / "split" / f"{n}.safetensors") for n in ("profile", "heldout"))
    expected = split_by_sequence(TRACE, 0.5, seed=3)
    assert [profile.sequences.tolist(), heldout.sequences.tolist()] == [t.sequences.tolist() for t in expected]
    assert (tmp_path / "split" / ".hydra" / "config.yaml").is_file()
