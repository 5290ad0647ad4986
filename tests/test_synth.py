"""Synthetic traces: every knob shows up in the statistics it controls."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from moetuner.apps.synth import main as synth_main
from moetuner.profiling.stats import compute_profile, follow_rate, imbalance, independent_follow_rate
from moetuner.synth import SynthError, SynthSpec, draw_distinct, synthesize
from moetuner.trace import load_trace

SMALL = dict(num_tokens=4000, num_layers=3, num_experts=32, top_k=4, group_size=8)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    a, b, c = (synthesize(SynthSpec(**SMALL, seed=s, affinity=0.3, coactivation=0.3)) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    assert (a.topk_ids != c.topk_ids).mean() > 0.5


def test_experts_of_a_token_are_distinct_at_deepseek_v3_width() -> None:
    trace = synthesize(SynthSpec(num_tokens=2000, num_layers=2, num_experts=256, top_k=8, group_size=8, skew=2.0,
                                 coactivation=0.5, affinity=0.5))
    ids = np.sort(trace.topk_ids, axis=-1)
    assert trace.topk_ids.shape == (2000, 2, 8) and trace.topk_ids.dtype == np.int16
    assert (np.diff(ids, axis=-1) > 0).all() and ids.max() < 256


@pytest.mark.parametrize("rounds", [3, 1, 0])  # 0: every row by the exponential race
def test_draw_distinct_follows_sequential_sampling_without_replacement(rounds: int) -> None:
    # first pick ~ p; P(second = j | first = i) = p_j / (1 - p_i): for p = [.5, .3, .2], P(first two = {0, 1})
    # = .5*.3/.5 + .3*.5/.7 = 0.5143
    p = np.array([0.5, 0.3, 0.2])
    draws = draw_distinct(p, 200_000, 2, np.random.default_rng(0), rounds=rounds)
    assert np.abs((draws[:, 0] == 0).mean() - 0.5) < 0.005
    assert np.abs((np.sort(draws, axis=1) == [0, 1]).all(axis=1).mean() - 0.5143) < 0.005


def test_skew_raises_the_load_imbalance() -> None:
    flat, skewed = (compute_profile(synthesize(SynthSpec(**SMALL, skew=s)), 500) for s in (0.0, 1.5))
    assert imbalance(flat.load).max() < 1.3 < 2.0 < imbalance(skewed.load).min()


def test_full_affinity_follows_one_successor_per_expert() -> None:
    trace = synthesize(SynthSpec(**SMALL, affinity=1.0))
    profile = compute_profile(trace, 500)
    for layer in range(2):
        successor = profile.transitions[layer].argmax(axis=1)  # [E]
        following = np.sort(successor[trace.topk_ids[:, layer]], axis=1)
        np.testing.assert_array_equal(following, np.sort(trace.topk_ids[:, layer + 1], axis=1))
    np.testing.assert_allclose(follow_rate(profile.transitions, profile.load), 1.0)


def test_no_affinity_follows_at_the_independence_rate() -> None:
    profile = compute_profile(synthesize(SynthSpec(**SMALL, affinity=0.0)), 500)
    np.testing.assert_allclose(follow_rate(profile.transitions, profile.load),
                               independent_follow_rate(profile.load, SMALL["top_k"]), atol=0.05)


def test_full_coactivation_keeps_tokens_inside_fixed_groups() -> None:
    trace = synthesize(SynthSpec(**{**SMALL, "group_size": 4}, coactivation=1.0))  # group_size == top_k
    coact = compute_profile(trace, 500).coactivation
    partners = (coact > 0).sum(axis=2)  # distinct co-chosen experts per expert
    assert (partners == 3).all()
    free = compute_profile(synthesize(SynthSpec(**{**SMALL, "group_size": 4})), 500).coactivation
    assert (free > 0).sum(axis=2).min() > 20


def domain_loads(trace, num_domains: int) -> np.ndarray:
    """Expert share of layer 0 per domain. [D, E]"""
    domains = np.array(json.loads(trace.extra["sequence_domains"]))[trace.seq_ids]
    loads = np.stack([np.bincount(trace.topk_ids[domains == d, 0].ravel(), minlength=trace.num_experts)
                      for d in range(num_domains)])
    return loads / loads.sum(axis=1, keepdims=True)


def test_domain_shift_moves_popularity_between_domains() -> None:
    def distance(shift: float) -> float:
        loads = domain_loads(synthesize(SynthSpec(**SMALL, num_domains=2, domain_shift=shift, seq_len=100)), 2)
        return 0.5 * np.abs(loads[0] - loads[1]).sum()

    assert distance(0.0) < 0.1 < 0.3 < distance(1.0)


def test_sequences_have_the_requested_length() -> None:
    trace = synthesize(SynthSpec(**{**SMALL, "num_tokens": 1050}, seq_len=100))
    assert np.bincount(trace.seq_ids).tolist() == [100] * 10 + [50]


@pytest.mark.parametrize(("knob", "message"), [
    ({"top_k": 40}, "top_k must be in"), ({"affinity": 1.5}, "affinity"), ({"group_size": 3}, "group_size"),
    ({"group_size": 12}, "divide num_experts"), ({"skew": -1.0}, "skew"),
])
def test_bad_knob_is_named(knob: dict, message: str) -> None:
    with pytest.raises(SynthError, match=message):
        synthesize(SynthSpec(**{**SMALL, **knob}))


def test_synth_app_writes_the_requested_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "s.safetensors"
    monkeypatch.setattr(sys, "argv", ["moetuner-synth", f"out={out}", "num_tokens=300", "num_layers=2",
                                      "num_experts=16", "top_k=2", "group_size=4", "seed=7", "mlflow=off"])
    synth_main()
    spec = SynthSpec(num_tokens=300, num_layers=2, num_experts=16, top_k=2, group_size=4, seed=7)
    np.testing.assert_array_equal(load_trace(out).topk_ids, synthesize(spec).topk_ids)


def test_synth_shape_presets() -> None:
    """conf/synth_shape: the default is DeepSeek-V2-Lite's shape; deepseek_v3 gives V3's expert shape."""
    from hydra import compose, initialize_config_dir

    from moetuner.apps.common import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        lite = compose("synth", overrides=["out=x"])
        v3 = compose("synth", overrides=["out=x", "synth_shape=deepseek_v3", "num_layers=2"])
    assert (lite.hidden_size, lite.moe_intermediate_size, lite.num_experts, lite.top_k) == (2048, 1408, 64, 6)
    assert (v3.hidden_size, v3.moe_intermediate_size, v3.num_experts, v3.top_k, v3.num_layers) == (7168, 2048, 256, 8, 2)
    trace = synthesize(SynthSpec(**{f: v3[f] for f in SynthSpec.__dataclass_fields__ if f != "num_tokens"},
                                 num_tokens=64).check())
    assert trace.hidden_size == 7168 and trace.moe_intermediate_size == 2048 and trace.topk_ids.shape == (64, 2, 8)
    assert trace.n_group == 8 and lite.n_group == 1  # V3's config.json: n_group 8; V2-Lite: 1
    # V3's layout: first_k_dense_replace = 3, so with 2 MoE layers the decoder layers are 0-4, MoE 3 and 4
    assert trace.moe_layers == [3, 4] and trace.extra["num_hidden_layers"] == "5" and v3.first_dense_layers == 3
    with pytest.raises(SynthError, match="n_group"):
        SynthSpec(num_experts=64, n_group=6).check()
