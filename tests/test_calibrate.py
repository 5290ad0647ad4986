"""moetuner-calibrate recovers known cost constants and reports predicted vs measured per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetuner.apps.calibrate import calibrate
from moetuner import CONF_DIR
from moetuner.serving.calibration import CalibrationError, CostFit, fit_costs, phase_times, stack_runs
from moetuner.serving.measure import PORT_COLUMNS
from moetuner.costmodel.cost import cost_model
from moetuner.topology import topology_from_config

TRUE = CostFit(expert_fixed_s=2e-4, expert_per_token_s=3e-6, intra_node_latency_s=1e-4,
               inter_node_latency_s=4e-4, intra_node_bw=2e9, inter_node_bw=0.1e9)


def synthetic_run(seed: int, load_scale: float, ranks: int = 4, inter: bool = True) -> pd.DataFrame:
    """per_layer rows whose times follow TRUE exactly: 3 steps x 4 layers x `ranks` ranks. Every rank's
    layer_s is the layer's time: the phases (the simulator's max over ports, by hand below) and the
    largest compute."""
    rng = np.random.default_rng(seed)
    groups, n = 12, 12 * ranks
    table = pd.DataFrame({"step": np.arange(n) // (4 * ranks), "layer": np.arange(n) // ranks % 4,
                          "rank": np.arange(n) % ranks, "active_slots": rng.integers(1, 5, n),
                          "pairs": (rng.integers(10, 200, n) * load_scale).astype(int)})
    single_node = table["layer"] == 3  # one layer keeps its traffic in the node: the intra latency shows
    for col in PORT_COLUMNS:  # and a few ports idle
        table[col] = rng.integers(0, 10**6 if col.endswith("intra") else 10**5, n) * (rng.random(n) > 0.1)
        if col.endswith("inter"):
            table.loc[single_node | (not inter), col] = 0
    table["bytes_intra"] = table["bytes_scatter_sent_intra"] + table["bytes_combine_sent_intra"]
    table["bytes_inter"] = table["bytes_scatter_sent_inter"] + table["bytes_combine_sent_inter"]
    table["compute_s"] = TRUE.expert_fixed_s * table["active_slots"] + TRUE.expert_per_token_s * table["pairs"]
    ports = table[PORT_COLUMNS].to_numpy(float).reshape(groups, ranks, 2, 2, 2)
    phases = np.zeros((groups, 2))
    for g, p, r, way in np.ndindex(groups, 2, ranks, 2):  # a2a_time by hand: max over ranks and directions
        intra, inter = ports[g, r, p, way]
        latency = TRUE.inter_node_latency_s if inter else TRUE.intra_node_latency_s if intra else 0.0
        phases[g, p] = max(phases[g, p], intra / TRUE.intra_node_bw + inter / TRUE.inter_node_bw + latency)
    np.testing.assert_allclose(phase_times(ports, 1 / np.array([TRUE.intra_node_bw, TRUE.inter_node_bw]),
                                           np.array([TRUE.intra_node_latency_s, TRUE.inter_node_latency_s])), phases)
    layer = phases.sum(1) + table.groupby(["step", "layer"])["compute_s"].max().to_numpy()
    table["layer_s"] = np.repeat(layer, ranks)
    table["scatter_s"] = np.repeat(phases[:, 0], ranks)
    table["combine_s"] = table["layer_s"] - table["scatter_s"] - table["compute_s"]
    return table


def test_fit_recovers_known_constants() -> None:
    fit = fit_costs(stack_runs({"a": synthetic_run(0, 1.0), "b": synthetic_run(1, 2.0)}))
    for got, want in zip(fit.__dict__.values(), TRUE.__dict__.values()):
        assert got == pytest.approx(want, rel=1e-4)


def test_no_inter_node_traffic_leaves_that_bandwidth_unfitted() -> None:
    fit = fit_costs(synthetic_run(0, 1.0, inter=False))
    assert fit.inter_node_bw is None and fit.inter_node_latency_s is None
    assert fit.intra_node_bw == pytest.approx(TRUE.intra_node_bw, rel=1e-4)


def test_app_writes_calibrated_topology_and_report(tmp_path: Path) -> None:
    dirs = []
    for i, scale in enumerate([1.0, 2.0, 4.0]):  # heavier load -> slower, so the ranking is known
        d = tmp_path / f"placement{i}"
        d.mkdir()
        synthetic_run(i, scale).to_csv(d / "per_layer.csv", index=False)
        dirs.append(str(d))
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("calibrate", overrides=[f"out={tmp_path / 'calib'}", f"runs=[{','.join(dirs)}]",
                                              "mlflow.enabled=false"])
    metrics = calibrate(cfg)
    assert metrics["spearman"] == pytest.approx(1.0) and metrics["max_rel_error"] < 1e-6
    topo = topology_from_config(OmegaConf.load(tmp_path / "calib" / "topology.yaml"))
    assert topo.inter_node_bw == pytest.approx(0.1e9) and topo.intra_node_bw == pytest.approx(2e9)
    assert topo.calibration["expert_per_token_s"] == pytest.approx(3e-6)
    cost = cost_model(topo, hidden_size=8, intermediate_size=8)  # the simulator accepts every key
    assert cost.per_token_s == pytest.approx(3e-6) and cost.fixed_s == pytest.approx(2e-4)
    assert cost.latency[0, 1] == pytest.approx(TRUE.intra_node_latency_s)  # ranks 0, 1: one node of cpu_2x2
    assert cost.latency[0, 3] == pytest.approx(TRUE.inter_node_latency_s)
    report = pd.read_csv(tmp_path / "calib" / "report.csv")
    assert list(report["run"]) == ["placement0", "placement1", "placement2"]
    assert (tmp_path / "calib" / "calibration.png").stat().st_size > 0


def test_folder_without_serve_outputs_is_refused(tmp_path: Path) -> None:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("calibrate", overrides=[f"out={tmp_path}/c", f"runs=[{tmp_path}]", "mlflow.enabled=false"])
    with pytest.raises(CalibrationError, match="no per_layer.csv"):
        calibrate(cfg)


def test_emulated_runs_are_read_in_target_units(tmp_path: Path) -> None:
    """An emulated run (dilation D, target bytes per replayed byte b): seconds / D and bytes x b, so
    the fit recovers the target's constants from the dilated rows."""
    import json

    from moetuner.serving.calibration import read_runs

    dilation, per_byte = 1000.0, 16.0
    target = synthetic_run(0, 1.0)
    emulated = target.copy()
    for col in ("compute_s", "scatter_s", "combine_s", "layer_s"):
        emulated[col] = target[col] * dilation
    for col in ("bytes_intra", "bytes_inter", *PORT_COLUMNS):
        emulated[col] = target[col] / per_byte
    run = tmp_path / "emulated"
    run.mkdir()
    emulated.to_csv(run / "per_layer.csv", index=False)
    (run / "metrics.json").write_text(json.dumps({"dilation": dilation, "target_bytes_per_byte": per_byte}))
    table = read_runs([str(run)])["emulated"]
    fit = fit_costs(stack_runs({"emulated": table, "target": synthetic_run(1, 2.0)}))
    assert fit.inter_node_bw == pytest.approx(TRUE.inter_node_bw, rel=1e-4)
    assert fit.expert_fixed_s == pytest.approx(TRUE.expert_fixed_s, rel=1e-6)


def test_unshaped_emulated_runs_are_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An emulated run on unshaped loopback measured no link of the target: the fit never sees it, and
    with no other run nothing is calibrated (metrics.json says so, no topology.yaml)."""
    import json

    dirs = []
    for i, scale in enumerate([1.0, 2.0, 4.0]):
        d = tmp_path / f"placement{i}"
        d.mkdir()
        synthetic_run(i, scale).to_csv(d / "per_layer.csv", index=False)
        dirs.append(str(d))
    (tmp_path / "placement2" / "metrics.json").write_text(json.dumps(
        {"dilation": 1.0, "target_bytes_per_byte": 1.0, "emulation_shaped": False}))

    def run(runs: list[str], out: str) -> dict:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("calibrate", overrides=[f"out={tmp_path / out}", f"runs=[{','.join(runs)}]",
                                                  "mlflow.enabled=false"])
        return calibrate(cfg)

    metrics = run(dirs, "calib")
    assert metrics["fitted"] is True and metrics["runs_left_out_unshaped"] == [dirs[2]]
    assert list(pd.read_csv(tmp_path / "calib" / "report.csv")["run"]) == ["placement0", "placement1"]
    assert f"{dirs[2]}: emulated on unshaped links" in caplog.text
    nothing = run([dirs[2]], "none")
    assert nothing == {"fitted": False, "runs_left_out_unshaped": [dirs[2]]}
    assert not (tmp_path / "none" / "topology.yaml").exists()
    assert json.loads((tmp_path / "none" / "metrics.json").read_text())["fitted"] is False
