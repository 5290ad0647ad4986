"""moetuner.study.cluster_check: what counts as the same study result on Slurm as locally."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from moetuner.study.cluster_check import MEASURED_TOLERANCE, CheckFailed, compare_serve, compare_summaries

ROWS = [("contiguous", 1.0, 0.5), ("eplb", 1.1, 0.4), ("steptail", 1.2, 0.3)]


def results(root: Path, steptail_map: list, eplb_speedup: float = 1.1, measured: float = 0.7,
            comm_error: float = 0.08) -> Path:
    rows = []
    for solver, speedup, predicted in ROWS:
        speedup = eplb_speedup if solver == "eplb" else speedup
        rows.append({"trace": "t", "topology": "cpu_2x2", "solver": solver, "replicas": 0, "eval": "heldout",
                     "predicted_layer_time_s": predicted, "speedup_vs_contiguous": speedup,
                     "measured_layer_time_s": measured, "comm_rel_error": comm_error, "solve_seconds": measured})
        placement = root / "placements" / "t" / "cpu_2x2" / f"{solver}-r0.json"
        placement.parent.mkdir(parents=True, exist_ok=True)
        placement.write_text(json.dumps({"physical_to_logical_map": steptail_map if solver == "steptail" else [[0, 1]]}))
    (root / "report").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "report" / "summary.csv", index=False)
    return root


def test_every_row_is_compared_timings_ignored_measured_within_tolerance(tmp_path: Path) -> None:
    local = results(tmp_path / "local", [[1, 0]], measured=0.70, comm_error=0.08)
    slurm = results(tmp_path / "slurm", [[1, 0]], measured=0.72, comm_error=0.10)  # 2.8% and 0.02 apart
    line = compare_summaries(local, slurm)
    assert line.startswith("placements: all 3 are identical") and "summary.csv: all 3 rows" in line
    assert f"measured_layer_time_s within {MEASURED_TOLERANCE['measured_layer_time_s'][1]:g} (relative)" in line


@pytest.mark.parametrize("change,column", [({"measured": 0.9}, "measured_layer_time_s"),  # 22% and 0.72 apart
                                           ({"comm_error": 0.80}, "comm_rel_error")])
def test_a_measured_column_beyond_its_tolerance_fails(tmp_path: Path, change: dict, column: str) -> None:
    local = results(tmp_path / "local", [[1, 0]], measured=0.7, comm_error=0.08)
    slurm = results(tmp_path / "slurm", [[1, 0]], **change)
    with pytest.raises(CheckFailed, match=f"{column} differs .* \\(tolerance: "):
        compare_summaries(local, slurm)


def test_a_placement_that_differs_fails(tmp_path: Path) -> None:
    local = results(tmp_path / "local", [[1, 0]])
    slurm = results(tmp_path / "slurm", [[0, 1]])  # steptail found another map: not deterministic
    with pytest.raises(CheckFailed, match="placement placements/t/cpu_2x2/steptail-r0 differs"):
        compare_summaries(local, slurm)


def test_a_resplit_placement_and_its_splits_rows_are_compared(tmp_path: Path) -> None:
    """A re-split's placements (placements/<trace>.split<seed>/...) and splits.csv rows are compared like the rest."""
    roots = [results(tmp_path / name, [[1, 0]]) for name in ("first", "second")]
    for root, layer_s in zip(roots, (0.30, 0.31)):
        path = root / "placements" / "t.split1" / "cpu_2x2" / "steptail-r0.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"physical_to_logical_map": [[1, 0]]}))
        pd.DataFrame([{"trace": "t", "topology": "cpu_2x2", "solver": "steptail", "replicas": 0, "eval": "heldout",
                       "split_seed": 1, "layer_time_s": layer_s}]).to_csv(root / "report" / "splits.csv", index=False)
    with pytest.raises(CheckFailed, match="splits.csv: layer_time_s differs for .*'split_seed': 1"):
        compare_summaries(*roots)
    (roots[1] / "placements" / "t.split1" / "cpu_2x2" / "steptail-r0.json").write_text(
        json.dumps({"physical_to_logical_map": [[0, 1]]}))
    with pytest.raises(CheckFailed, match="placement placements/t.split1/cpu_2x2/steptail-r0 differs"):
        compare_summaries(*roots)


def test_phase_placements_and_phases_rows_are_compared(tmp_path: Path) -> None:
    """The `phases` section's placements (phases/<trace>/<deployment>/<solver>/<phase>.json, engine files beside
    them left out) and phases.csv rows are compared like the rest."""
    roots = [results(tmp_path / name, [[1, 0]]) for name in ("first", "second")]
    for root, step_ms in zip(roots, (4.2, 4.3)):
        folder = root / "phases" / "t" / "tiny" / "steptail"
        folder.mkdir(parents=True)
        for name in ("prefill.json", "decode.json", "decode.sglang.json"):
            (folder / name).write_text(json.dumps({"physical_to_logical_map": [[1, 0]]}))
        pd.DataFrame([{"trace": "t", "deployment": "tiny", "phase": "decode", "eval": "heldout", "solver": "steptail",
                       "step_time_ms": step_ms}]).to_csv(root / "report" / "phases.csv", index=False)
    with pytest.raises(CheckFailed, match="phases.csv: step_time_ms differs for .*'phase': 'decode'"):
        compare_summaries(*roots)
    pd.read_csv(roots[0] / "report" / "phases.csv").to_csv(roots[1] / "report" / "phases.csv", index=False)
    assert compare_summaries(*roots).startswith("placements: all 5 are identical")  # 3 + prefill and decode
    (roots[1] / "phases" / "t" / "tiny" / "steptail" / "decode.json").write_text(
        json.dumps({"physical_to_logical_map": [[0, 1]]}))
    with pytest.raises(CheckFailed, match="placement phases/t/tiny/steptail/decode differs"):
        compare_summaries(*roots)


def test_a_different_value_is_named_with_its_row(tmp_path: Path) -> None:
    local = results(tmp_path / "local", [[1, 0]])
    slurm = results(tmp_path / "slurm", [[1, 0]], eplb_speedup=1.2)
    with pytest.raises(CheckFailed, match="speedup_vs_contiguous differs for .*'solver': 'eplb'"):
        compare_summaries(local, slurm)


def test_serve_traffic_must_match(tmp_path: Path) -> None:
    for name, sent in (("local", 100.0), ("slurm", 101.0)):
        results(tmp_path / name, [[1, 0]])
        run = tmp_path / name / "serve" / "t" / "cpu_2x2" / "eplb-r0"
        run.mkdir(parents=True)
        run.joinpath("metrics.json").write_text(json.dumps({"steps": 1, "bytes_inter_per_step": sent,
                                                            "moe_layer_time_s": sent}))
    with pytest.raises(CheckFailed, match="bytes_inter_per_step"):
        compare_serve(tmp_path / "local", tmp_path / "slurm")


def test_a_plain_cpu_serve_timing_is_not_compared(tmp_path: Path) -> None:
    """No injected_share: the run was not emulated, its time is the host's wall clock (like solve_seconds)."""
    local = results(tmp_path / "local", [[1, 0]], measured=0.077)
    slurm = results(tmp_path / "slurm", [[1, 0]], measured=0.042)
    for root in (local, slurm):
        table = pd.read_csv(root / "report" / "summary.csv").assign(injected_share=float("nan"))
        table.to_csv(root / "report" / "summary.csv", index=False)
    assert "3 plain CPU serve timings not compared" in compare_summaries(local, slurm)
    for root, share in ((local, 0.53), (slurm, 0.53)):  # emulated: the same gap fails
        table = pd.read_csv(root / "report" / "summary.csv").assign(injected_share=share)
        table.to_csv(root / "report" / "summary.csv", index=False)
    with pytest.raises(CheckFailed, match="measured_layer_time_s differs"):
        compare_summaries(local, slurm)


def test_the_measured_spread_over_runs_by_hand(tmp_path: Path) -> None:
    """Three runs of two emulated serves (and a plain one, left out): the largest relative spread of the target
    time and the largest absolute spread of the transfer error, placement by placement."""
    from moetuner.study.cluster_check import measured_spread

    runs = {"a": {"eplb": (0.70, 0.08), "steptail": (0.50, 0.30)}, "b": {"eplb": (0.77, 0.10), "steptail": (0.50, 0.31)},
            "c": {"eplb": (0.72, 0.02), "steptail": (0.51, 0.30)}}
    for name, served in runs.items():
        for solver, (target, error) in served.items():
            run = tmp_path / name / "serve" / "t" / "g" / f"{solver}-r0"
            run.mkdir(parents=True)
            run.joinpath("metrics.json").write_text(json.dumps(
                {"moe_layer_time_s": target * 5000, "target_moe_layer_time_s": target, "comm_rel_error": error,
                 "injected_share": 0.5}))
        plain = tmp_path / name / "serve" / "t" / "g" / "contiguous-r0"
        plain.mkdir(parents=True)
        plain.joinpath("metrics.json").write_text(json.dumps({"moe_layer_time_s": 1.0 if name == "a" else 9.0}))
    spread = measured_spread([tmp_path / name for name in runs])
    assert spread["measured_layer_time_s"] == pytest.approx((0.77 - 0.70) / 0.77)
    assert spread["comm_rel_error"] == pytest.approx(0.08)
    with pytest.raises(AssertionError):
        measured_spread([tmp_path / "a"])
