"""The report's pure parts against hand-computed answers (the whole report runs in test_workflow.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moetuner.report.collect import gap_to_bound, speedup_vs_contiguous
from moetuner.solvers.mip import relative_gap
from moetuner.report.document import markdown_table
from moetuner.placement import gpu_loads
from moetuner.profiling.stats import expert_load
from moetuner.report.figures import relative_load
from moetuner.report.headline import (dispatch_tables, headline_metrics, headline_sentences, headline_tables, headline_trace,
                                      html_headline, markdown_headline, regime_sentence)
from moetuner.report.phase_section import (COLUMNS as PHASE_COLUMNS, phase_section, phase_sentence, phase_sentences,
                                           phase_table)
from moetuner.report.regime import regime_table, tile_tokens
from moetuner.study import targets
from moetuner.costmodel.cost import CostModel


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
    """One gap for moetuner-solve's metrics and the report: (objective - bound) / |objective|, clamped at 0."""
    assert relative_gap(10.0, 8.0) == pytest.approx(0.2)
    assert relative_gap(10.0, 10.0) == 0.0
    assert relative_gap(8.0, 10.0) == 0.0  # a bound above the incumbent (solver tolerance) is no negative gap
    assert relative_gap(10.0, None) is None


def test_speedup_is_against_contiguous_of_the_same_case() -> None:
    sim = pd.DataFrame({"trace": ["a", "a", "a", "a"], "topology": ["t"] * 4, "eval": ["h", "h", "o", "o"],
                        "solver": ["contiguous", "eplb", "contiguous", "eplb"], "replicas": [0, 1, 0, 1],
                        "layer_time_s": [4.0, 2.0, 3.0, 6.0]})
    np.testing.assert_allclose(speedup_vs_contiguous(sim), [1.0, 2.0, 1.0, 0.5])


def test_markdown_table() -> None:
    table = pd.DataFrame({"solver": ["eplb"], "time": [0.123456], "gap": [float("nan")]})
    assert markdown_table(table).splitlines() == ["| solver | time | gap |", "|---|---|---|", "| eplb | 0.1235 | - |"]


# --- headline: tables, bold best, metrics and generated sentences on a hand-made table ------------------------

HELD = {("h100_1x8", 0): {"eplb": 1.015, "steptail": 1.023}, ("h200_2x8", 0): {"eplb": 1.120, "steptail": 1.144},
        ("h200_2x8", 1): {"eplb": 0.967, "steptail": 1.098}}
OTHER = {("h100_1x8", 0): {"eplb": 0.999, "steptail": 1.009}, ("h200_2x8", 0): {"eplb": 0.993, "steptail": 0.994},
         ("h200_2x8", 1): {"eplb": 0.954, "steptail": 0.987}}


def results_rows(cells: dict, trace: str, ev: str) -> list[dict]:
    """Rows of a results table (the columns the headline reads), contiguous r0 at 1.0 included."""
    rows = [{"trace": trace, "topology": g, "solver": s, "replicas": r, "eval": ev, "speedup_vs_contiguous": v}
            for (g, r), by_solver in cells.items() for s, v in by_solver.items()]
    rows += [{"trace": trace, "topology": g, "solver": "contiguous", "replicas": 0, "eval": ev,
              "speedup_vs_contiguous": 1.0} for g in sorted({g for g, _ in cells})]
    return rows


def hand_table(held: dict = HELD, other: dict = OTHER) -> pd.DataFrame:
    # a second trace with more rows but no other-domain evaluation must not take the headline
    extra = {(f"t{i}", 0): {"eplb": 1.5} for i in range(8)}
    return pd.DataFrame(results_rows(held, "a", "heldout") + results_rows(other, "a", "b")
                        + results_rows(extra, "z", "heldout"))


def test_headline_tables_pick_the_transferred_trace_and_drop_contiguous() -> None:
    table = hand_table()
    assert headline_trace(table) == "a"
    tables = headline_tables(table, "a")
    assert list(tables) == ["heldout", "b"]
    held = tables["heldout"]
    assert list(held.columns) == ["eplb", "steptail"]
    assert list(held.index) == [("h100_1x8", 0), ("h200_2x8", 0), ("h200_2x8", 1)]
    assert held.loc[("h200_2x8", 1), "eplb"] == 0.967
    assert headline_trace(hand_table().query("trace == 'z'")) == "z"


def test_headline_markdown_and_html_bold_the_row_best() -> None:
    tables = headline_tables(hand_table(), "a")
    assert markdown_headline(tables["heldout"]).splitlines() == [
        "| topology | replicas | eplb | steptail |", "|---|---|---|---|",
        "| h100_1x8 | r0 | 1.015 | **1.023** |", "| h200_2x8 | r0 | 1.120 | **1.144** |",
        "| h200_2x8 | r1 | 0.967 | **1.098** |"]
    page = html_headline(tables["b"])
    assert "<td>h100_1x8</td><td>r0</td><td>0.999</td><td><b>1.009</b></td>" in page
    assert page.count("<b>") == 3


def test_headline_metrics_name_every_cell() -> None:
    metrics = headline_metrics(headline_tables(hand_table(), "a"))
    assert len(metrics) == 12
    assert metrics["speedup.heldout.h200_2x8.r1.steptail"] == 1.098
    assert metrics["speedup.b.h100_1x8.r0.eplb"] == 0.999


def test_dispatch_tables_put_each_replicated_setting_under_every_dispatch() -> None:
    rows = [  # trace, topology, solver, replicas, eval, speedup under dynamic / lp
        ("t", "g", "eplb", 1, "heldout", 1.10, 0.95), ("t", "g", "steptail", 1, "heldout", 1.20, 1.25),
        ("t", "g", "eplb", 0, "heldout", 1.05, 1.05),  # no replicas: every dispatch is the same, left out
        ("t", "g", "eplb", 1, "other", 0.90, 0.80),  # another domain: not in these tables
        ("t", "g", "contiguous", 1, "heldout", 1.0, 1.0)]
    table = pd.DataFrame(rows, columns=["trace", "topology", "solver", "replicas", "eval",
                                        "speedup_vs_contiguous.dynamic", "speedup_vs_contiguous.lp"])
    tables = dispatch_tables(table, "t")
    assert list(tables) == ["g r1"]
    frame = tables["g r1"]
    assert list(frame.index) == ["dynamic", "lp"] and list(frame.columns) == ["eplb", "steptail"]
    assert frame.loc["lp", "eplb"] == 0.95 and frame.loc["dynamic", "steptail"] == 1.20
    assert markdown_headline(frame).splitlines()[3] == "| lp | 0.950 | **1.250** |"


def test_headline_sentences_from_hand_computed_numbers() -> None:
    sentences = headline_sentences(headline_tables(hand_table(), "a"), "a")
    # mean best per setting: held-out (1.023 + 1.144 + 1.098) / 3 = 1.088, b (1.009 + 0.994 + 0.987) / 3 = 0.997
    assert sentences == [
        "On held-out a routing, steptail is the fastest placement in all 3 settings, from 1.023x to 1.144x "
        "contiguous (largest on h200_2x8 r0).",
        "Placement matters most on h200_2x8 r0 (best 1.144x) and least on h100_1x8 r0 (best 1.023x).",
        "On h200_2x8, going from r0 to r1 replicas lowers the best speedup from 1.144x to 1.098x.",
        "Scored on b, another domain, the best speedup per setting falls from 1.088x to 0.997x on average, "
        "and 2 of 3 settings are no faster than contiguous."]


def test_headline_sentences_with_split_winners_and_a_limit() -> None:
    held = {**HELD, ("h100_1x8", 0): {"eplb": 1.030, "steptail": 1.023}}
    tables = headline_tables(hand_table(held=held), "a")
    sentences = headline_sentences(tables, "a", limit=2)
    assert sentences == [
        "On held-out a routing, the fastest placement is steptail in 2 of 3 settings and eplb in 1; the largest "
        "speedup is 1.144x contiguous (steptail on h200_2x8 r0).",
        "Scored on b, another domain, the best speedup per setting falls from 1.091x to 0.997x on average, "
        "and 2 of 3 settings are no faster than contiguous; the winner changes in 1 of 3."]


def test_headline_of_one_setting_without_another_domain() -> None:
    table = pd.DataFrame(results_rows({("cpu_2x2", 0): {"eplb": 0.95}}, "s", "heldout"))
    tables = headline_tables(table, headline_trace(table))
    assert headline_sentences(tables, "s") == [
        "On held-out s routing, the fastest placement is eplb, at 0.950x contiguous (cpu_2x2 r0)."]


def test_regime_sentence() -> None:
    regime = pd.DataFrame({"topology": ["g"] * 4, "step_tokens": [256, 256, 16384, 16384],
                           "speedup_vs_contiguous": [1.01, 1.002, 1.2, 1.1]})
    assert regime_sentence(regime) == ("The best placement's speedup vs contiguous goes on g from 1.010x at 256 "
                                       "tokens per step to 1.200x at 16384.")


# --- regime: tiling and the speedup against tokens per step -----------------------------------------------------

def test_tile_tokens_repeats_in_order_only_when_short() -> None:
    ids = np.arange(6).reshape(3, 1, 2)  # [T=3, L=1, k=2]
    weights = ids[..., ::-1] / 10.0
    same, same_w = tile_tokens(ids, weights, 3)
    assert same is ids and same_w is weights
    tiled, tiled_w = tile_tokens(ids, weights, 7)
    np.testing.assert_array_equal(tiled[:, 0, 0], [0, 2, 4, 0, 2, 4, 0])
    np.testing.assert_array_equal(tiled_w[:, 0, 1], [0.0, 0.2, 0.4, 0.0, 0.2, 0.4, 0.0])
    assert tile_tokens(ids, None, 7)[1] is None


def test_regime_table_by_hand() -> None:
    # 2 GPUs, 4 experts, 1 layer, top-1; tokens alternate experts 0 and 1. Free links, 1 s per token:
    # contiguous [0 1 | 2 3] puts every token on GPU 0, [0 2 | 1 3] splits them evenly, so the compute
    # tail (= the step time) halves at every step size.
    cost = CostModel(per_token_s=1.0, floor_s=0.0, fixed_s=0.0, token_bytes=2.0,
                     bandwidth=np.full((2, 2), np.inf), latency=np.zeros((2, 2)), node=np.zeros(2, dtype=int))
    ids = np.array([0, 1, 0, 1]).reshape(4, 1, 1)
    table = regime_table({("split", 0): np.array([[0, 2, 1, 3]])}, "g", cost, ids, None, 4, [8, 2, 4],
                         "dispatch_combine")
    assert list(table["step_tokens"]) == [2, 4, 8]
    assert list(table["num_steps"]) == [2, 1, 1] and list(table["tiled"]) == [False, False, True]
    np.testing.assert_allclose(table["contiguous_layer_time_s"], [2.0, 4.0, 8.0])
    np.testing.assert_allclose(table["layer_time_s"], [1.0, 2.0, 4.0])
    np.testing.assert_allclose(table["speedup_vs_contiguous"], 2.0)
    assert set(table["label"]) == {"split-r0"}


def test_regime_charges_lp_as_simulate_does() -> None:
    # 2 GPUs, 3 experts, expert 0 on both GPUs: [0 1 | 2 0]; steps of 4 tokens [0 1 0 1], 1 s per token, free links.
    # lp sends both expert-0 pairs to GPU 1 (GPU 0 holds the two expert-1 pairs): tail 2 s, plus the 100 us
    # decision (the counts all-gather is free on these links); contiguous [0 1 | 2 -] puts all 4 on GPU 0.
    cost = CostModel(per_token_s=1.0, floor_s=0.0, fixed_s=0.0, token_bytes=2.0,
                     bandwidth=np.full((2, 2), np.inf), latency=np.zeros((2, 2)), node=np.zeros(2, dtype=int))
    ids = np.array([0, 1, 0, 1]).reshape(4, 1, 1)
    table = regime_table({("eplb", 1): np.array([[0, 1, 2, 0]])}, "g", cost, ids, None, 3, [4], "dispatch_combine",
                         dispatch={("eplb", 1): "lp"})
    np.testing.assert_allclose(table["layer_time_s"], [2.0 + 100e-6])
    np.testing.assert_allclose(table["speedup_vs_contiguous"], [4.0 / (2.0 + 100e-6)])


def test_regime_memory_bound_floor_hides_placement_at_small_steps() -> None:
    # A weight-read floor of 4 s per active slot. Experts 0 and 1 are hot (3 tokens each of every 8),
    # 2 and 3 cold (1 each). At 8 tokens per step every slot pays the floor: contiguous [0 1 | 2 3] and
    # split [0 2 | 1 3] both take 4 + 4 = 8 s. At 64 tokens (the 8 repeated) counts are 24/24/8/8:
    # contiguous 24 + 24 = 48 s on GPU 0, split 24 + 8 = 32 s on each GPU, so placement gives 1.5x.
    cost = CostModel(per_token_s=1.0, floor_s=4.0, fixed_s=0.0, token_bytes=2.0,
                     bandwidth=np.full((2, 2), np.inf), latency=np.zeros((2, 2)), node=np.zeros(2, dtype=int))
    ids = np.array([0, 1, 0, 1, 0, 1, 2, 3]).reshape(8, 1, 1)
    table = regime_table({("split", 0): np.array([[0, 2, 1, 3]])}, "g", cost, ids, None, 4, [8, 64],
                         "dispatch_combine")
    np.testing.assert_allclose(table["contiguous_layer_time_s"], [8.0, 48.0])
    np.testing.assert_allclose(table["speedup_vs_contiguous"], [1.0, 1.5])


def test_transfer_sentence_of_one_setting() -> None:
    table = pd.DataFrame(results_rows({("g", 0): {"eplb": 1.2}}, "a", "heldout")
                         + results_rows({("g", 0): {"eplb": 0.9}}, "a", "b"))
    assert headline_sentences(headline_tables(table, "a"), "a")[-1] == \
        "Scored on b, another domain, the best speedup on g r0 falls from 1.200x to 0.900x, no faster than contiguous."


# --- intervals, serve runs and solver labels in the headline ------------------------------------------------------

def test_winner_sentence_calls_faster_only_outside_the_interval() -> None:
    from moetuner.report.headline import winner_margins

    tables = headline_tables(hand_table(), "a")
    base = np.array([1.0, 1.1, 0.9, 1.0])
    steps = {("a", "h100_1x8", "eplb", 0, "heldout"): base,  # steptail 1.023 vs eplb 1.015: noise either way
             ("a", "h100_1x8", "steptail", 0, "heldout"): base * np.array([0.95, 1.04, 0.97, 1.03]),
             ("a", "h200_2x8", "eplb", 0, "heldout"): base,  # steptail 2% faster on every step
             ("a", "h200_2x8", "steptail", 0, "heldout"): base / 1.02}
    margins = winner_margins(tables, steps, "a")
    held = margins["heldout"]
    assert list(held.index) == [("h100_1x8", 0), ("h200_2x8", 0)]  # h200_2x8 r1 has no step times: left out
    assert held.loc[("h200_2x8", 0), "low"] == pytest.approx(1.02) and held.loc[("h200_2x8", 0), "high"] == \
        pytest.approx(1.02)
    low, high = held.loc[("h100_1x8", 0), ["low", "high"]]
    assert low < 1.0 < high
    sentence = headline_sentences(tables, "a", margins=margins)[0]
    assert sentence.startswith("On held-out a routing, the highest speedup is steptail in 3 of 3 settings "
                               "(largest 1.144x contiguous, steptail on h200_2x8 r0); it is faster than the runner-up")
    assert "on h200_2x8 r0 (vs eplb: 1.020-1.020x)" in sentence
    assert f"and not distinguishable from the runner-up on h100_1x8 r0 (vs eplb: {low:.3f}-{high:.3f}x)." in sentence


def test_faster_only_when_the_runner_up_is_beaten_in_every_split() -> None:
    """Re-splits (main seed 0, seeds 1 and 2 as `a.split<seed>`): steptail beats eplb by 2% on every step of the
    main split, so that split's interval excludes 1.0, but loses in split 2 on h200_2x8 r0, so only h100_1x8
    r0 is called faster; the per-split speedups are the ratios of the mean step times."""
    from moetuner.report.headline import over_splits, winner_margins

    tables = headline_tables(hand_table(), "a")
    base = np.array([1.0, 1.1, 0.9, 1.0])
    factors = {"a": 1.02, "a.split1": 1.01, "a.split2": 1.03}  # steptail's speedup over eplb in each split
    steps = {}
    for name, factor in factors.items():
        for topology, lost in (("h100_1x8", False), ("h200_2x8", name == "a.split2")):
            steps[name, topology, "eplb", 0, "heldout"] = base
            steps[name, topology, "steptail", 0, "heldout"] = base * factor if lost else base / factor
    margins = winner_margins(tables, steps, "a", seeds=[0, 1, 2], main_seed=0)["heldout"]
    h100, h200 = margins.loc[("h100_1x8", 0)], margins.loc[("h200_2x8", 0)]
    assert (h100["splits"], h100["split_min"], h100["split_max"]) == (3, pytest.approx(1.01), pytest.approx(1.03))
    assert bool(h100["every_split"]) and not bool(h200["every_split"])
    assert h200["split_min"] == pytest.approx(1 / 1.03) and h200["low"] == pytest.approx(1.02)  # main split: faster
    # every step of a split moves by the same factor, so resampling steps changes nothing: the interval over
    # splits lies within the ratios of the pooled means of the splits drawn (between 1/1.03 and 1.02)
    assert 1 / 1.03 - 1e-9 <= h200["split_low"] <= h200["split_high"] <= 1.02 + 1e-9
    sentence = headline_sentences(tables, "a", margins={"heldout": margins})[0]
    assert "it is faster than the runner-up (paired 95% bootstrap interval over the main split's scored steps " \
           "excludes 1.0, and the runner-up is beaten in every re-split;" in sentence
    assert "on h100_1x8 r0 (vs eplb: 1.020-1.020x; 1.010-1.030x across 3 splits, " in sentence
    assert "and not shown faster than the runner-up on h200_2x8 r0 (vs eplb: 1.020-1.020x; 0.971-1.020x across " \
           "3 splits" in sentence
    # a missing split's run: that setting falls back to the main split's interval alone
    del steps["a.split1", "h100_1x8", "steptail", 0, "heldout"]
    fallback = winner_margins(tables, steps, "a", seeds=[0, 1, 2], main_seed=0)["heldout"].loc[("h100_1x8", 0)]
    assert fallback["splits"] == 1 and np.isnan(fallback["every_split"])
    assert over_splits([base, base], [base / 2, base * 2])["per_split"] == [2.0, 0.5]


def test_verdict_of_a_margin() -> None:
    from moetuner.report.headline import verdict

    row = pd.Series({"low": 1.01, "high": 1.03, "every_split": True})
    assert verdict(row) == "faster"
    assert verdict(pd.Series({"low": 1.01, "high": 1.03, "every_split": False})) == "not in every split"
    assert verdict(pd.Series({"low": 0.99, "high": 1.03, "every_split": True})) == "not distinguishable"
    assert verdict(pd.Series({"low": 1.01, "high": 1.03, "every_split": np.nan})) == "faster in the one split"


def test_split_table_and_summary_from_a_results_folder(tmp_path) -> None:
    """Simulate runs of the main split (seed 0) and the re-split a.split3 read back with their seeds; the summary
    gives each split's speedup vs contiguous (mean step times), their mean, and the interval over splits."""
    import json

    from moetuner.report.collect import split_table, step_times
    from moetuner.report.headline import split_display, split_summary
    from moetuner.study.targets import simulate_path

    times = {("a", "contiguous"): [4.0, 4.0], ("a", "eplb"): [2.0, 2.0],
             ("a.split3", "contiguous"): [3.0, 3.0], ("a.split3", "eplb"): [3.0, 3.0],
             ("b", "contiguous"): [1.0, 1.0]}  # b was not re-split: not in the split table
    for (name, solver), step_s in times.items():
        path = tmp_path / simulate_path("", name, "g", solver, 0, "heldout").lstrip("/")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"layer_time_s": float(np.mean(step_s)), "step_times_s": step_s}))
    table = split_table(tmp_path, main_seed=0)
    assert list(zip(table["trace"], table["solver"], table["split_seed"], table["speedup_vs_contiguous"])) == [
        ("a", "contiguous", 0, 1.0), ("a", "contiguous", 3, 1.0), ("a", "eplb", 0, 2.0), ("a", "eplb", 3, 1.0)]
    summary = split_summary(table, step_times(tmp_path), "a", main_seed=0)
    row = summary.iloc[0]
    assert (row["solver"], row["splits"], row["split_0"], row["split_3"], row["mean"]) == ("eplb", 2, 2.0, 1.0, 1.5)
    assert not row["every_split"] and 1.0 <= row["split_low"] <= row["split_high"] <= 2.0
    assert list(split_display(summary, "heldout").iloc[0]) == ["g", "r0", "eplb", "2.000", "1.000", "1.500",
                                                               f"{row['split_low']:.3f}-{row['split_high']:.3f}", "no"]


def test_headline_cells_carry_their_intervals() -> None:
    from moetuner.report.headline import headline_intervals

    table = hand_table()
    table["speedup_ci_low"], table["speedup_ci_high"] = table["speedup_vs_contiguous"] - 0.01, \
        table["speedup_vs_contiguous"] + 0.02
    tables, intervals = headline_tables(table, "a"), headline_intervals(table, "a")
    assert markdown_headline(tables["heldout"], intervals["heldout"]).splitlines()[2] == \
        "| h100_1x8 | r0 | 1.015 (1.005-1.035) | **1.023** (1.013-1.043) |"


def test_unshaped_serve_runs_stay_out_of_the_headline() -> None:
    from moetuner.report.headline import serve_sentence

    rows = pd.DataFrame({"topology": ["h200_2x8"] * 3, "solver": ["contiguous", "eplb", "steptail"],
                         "measured_layer_time_s": [1.10, 0.99, 5.0], "served_predicted_layer_time_s": [1.0, 1.0, 1.0],
                         "serve_links_shaped": [True, True, False], "injected_share": [0.5, 0.6, 0.9],
                         "comm_rel_error": [0.2, -0.05, 4.0]})
    assert serve_sentence(rows) == (
        "Served on the emulated h200_2x8 with shaped links (2 placements), the measured step time is -1.0% to "
        "+10.0% off the prediction, and -5.0% to +20.0% on the transfers alone: the emulation waits out 50%-60% of "
        "the predicted time (expert compute and link latency) from the cost model itself, so only the transfers "
        "are measured. 1 serve run on unshaped links (emulation without root) is left out.")
    assert serve_sentence(rows.assign(serve_links_shaped=False)) == \
        "3 serve runs on unshaped links (emulation without root) are left out."
    assert serve_sentence(rows.assign(measured_layer_time_s=np.nan)) is None
    plain = rows.assign(served_predicted_layer_time_s=np.nan, predicted_layer_time_s=[1.0, 0.9, 1.0],
                        injected_share=np.nan, comm_rel_error=np.nan)  # plain runs: judged by the simulate run
    assert serve_sentence(plain).startswith("Served on the h200_2x8 with shaped links (2 placements), the "
                                            "measured step time is +10.0% to +10.0% off the prediction.")


def test_solver_label_says_what_ran() -> None:
    from moetuner.report.collect import ILP2_SKIPPED, solver_label

    skipped = {"ilp2_seconds": None,
               "fallback_reasons": ["ILP2 needs 1536000 variables > ilp2_max_vars=200000; affinity assignment used"]}
    assert solver_label("moetuner", skipped) == ILP2_SKIPPED == \
        "MoETuner ILP1 + affinity mapping (ILP2 skipped at this size)"
    assert solver_label("moetuner", {"ilp2_seconds": 2.9, "fallback_reasons": []}) == "MoETuner ILP1 + ILP2"
    assert solver_label("moetuner", {"ilp2_seconds": 2.9, "fallback_reasons": ["ILP2: infeasible, affinity "
                                                                               "assignment used"]}) == \
        "MoETuner ILP1 + affinity mapping (ILP2 failed)"
    assert solver_label("eplb", {}) == "eplb"


# --- the phases section (moetuner/report/phase_section.py) ------------------------------------------------

def write_phase_run(results: Path, solver: str, phase: str, steps_s: list[float], bound_s: float | None) -> None:
    path = Path(targets.phase_simulate_path(str(results), "intent", "v2_lite", solver, phase, "heldout"))
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"topology": "h800_4x8" if phase == "decode" else "h800_1x8", "num_gpus": 32 if phase == "decode" else 8,
           "step_tokens": 4096 if phase == "decode" else 32768, "dataflow": "low_latency" if phase == "decode" else
           "dispatch_combine", "layer_time_s": float(np.mean(steps_s)), "step_times_s": steps_s}
    path.write_text(json.dumps(doc if bound_s is None else {**doc, "bound_step_s": bound_s}))


def test_phase_table_compares_each_phase_with_eplb_by_hand(tmp_path: Path) -> None:
    write_phase_run(tmp_path, "eplb", "decode", [4.0, 4.0, 4.0, 4.0], 2.0)  # the phase's bound, computed once
    write_phase_run(tmp_path, "steptail", "decode", [2.0, 2.0, 2.0, 2.0], None)  # exactly twice as fast, every step
    write_phase_run(tmp_path, "metro", "decode", [4.0, 8.0, 4.0, 8.0], None)  # 6 / 4: 1.5x slower than EPLB
    write_phase_run(tmp_path, "eplb", "prefill", [1.0, 3.0], None)
    write_phase_run(tmp_path, "steptail", "prefill", [1.0, 3.0], None)  # the same steps: a tie
    table = phase_table(tmp_path)
    assert list(table.columns) == PHASE_COLUMNS
    decode = table[table.phase == "decode"]
    assert list(decode.solver) == ["steptail", "eplb", "metro"]  # fastest first
    assert list(decode.tokens_per_rank) == [128] * 3 and set(decode.topology) == {"h800_4x8"}
    assert decode.vs_reference.tolist() == pytest.approx([2.0, 1.0, 4.0 / 6.0])
    # steps of equal time: every bootstrap resample gives the same ratio
    assert decode.iloc[0][["vs_reference_low", "vs_reference_high"]].tolist() == pytest.approx([2.0, 2.0])
    assert decode.gap_to_bound.tolist() == pytest.approx([1.0, 2.0, 3.0])  # each time / the one bound of 2.0
    prefill = table[table.phase == "prefill"].reset_index(drop=True)
    assert prefill.vs_reference.tolist() == [1.0, 1.0] and prefill.gap_to_bound.isna().all()
    assert list(prefill.tokens_per_rank) == [4096, 4096]
    sentences = {phase: phase_sentence(group.reset_index(drop=True)) for phase, group in table.groupby("phase")}
    assert "fastest placement is steptail: 2.000x eplb's speed [2.000, 2.000]" in sentences["decode"]
    assert "interval over the scored steps excludes 1" in sentences["decode"]
    assert "1.00x the fixed-placement lower bound" in sentences["decode"]
    assert "a tie" in sentences["prefill"] and "lower bound" not in sentences["prefill"]
    assert list(table.phase.unique()) == ["prefill", "decode"]  # the order a request is served in
    assert [sentence.split(" on ")[0] for sentence in phase_sentences(table)] == ["At prefill", "At decode"]
    write_phase_run(tmp_path, "steptail", "prefill", [1.1, 3.3], None)  # now 10% slower than the reference
    prefill = phase_table(tmp_path).query("phase == 'prefill'").reset_index(drop=True)
    assert "fastest placement is eplb (the reference); runner-up steptail at 0.909x its speed [0.909, 0.909]; " \
           "the interval over the scored steps excludes 1" in phase_sentence(prefill)
    section = phase_section(table)
    assert section is not None and section.markdown.count("### ") == 2 and "<h3>" in section.html


def test_gap_to_bound_divides_the_one_bound_of_each_setting() -> None:
    sim = pd.DataFrame({"trace": ["t"] * 5, "topology": ["g"] * 5, "replicas": [0, 0, 0, 1, 1],
                        "eval": ["heldout"] * 4 + ["other"], "solver": ["a", "b", "c", "a", "a"],
                        "layer_time_s": [2.0, 3.0, 4.0, 5.0, 6.0], "bound_step_s": [1.0, np.nan, np.nan, np.nan, np.nan]})
    gap = gap_to_bound(sim)
    assert gap.iloc[:3].tolist() == [2.0, 3.0, 4.0]  # every solver of (t, g, r0, heldout) over its one bound
    assert gap.iloc[3:].isna().all()  # settings whose runs computed none
    assert gap_to_bound(sim.drop(columns="bound_step_s")).isna().all()


def test_phase_table_is_empty_without_phase_runs(tmp_path: Path) -> None:
    table = phase_table(tmp_path)
    assert table.empty and list(table.columns) == PHASE_COLUMNS
    assert phase_section(table) is None
