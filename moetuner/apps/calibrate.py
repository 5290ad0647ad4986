"""moetuner-calibrate: fit the simulator's cost constants from moetuner-serve runs.

    moetuner-calibrate runs=[serve/contiguous,serve/eplb] topology=cpu_2x2 out=calib
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_atomic, write_json_atomic, write_text_atomic
from moetuner.serving.calibration import (calibrated_topology, compare, fit_costs, plot_comparison,
                                          read_runs, split_shaped, stack_runs)
from moetuner.tracking import AppResult, AppRun, tracked_app

log = logging.getLogger(__name__)


def calibrate(cfg: DictConfig) -> dict:
    """Fit, write topology.yaml / report.csv / calibration.png / metrics.json under cfg.out; return metrics.

    Emulated runs on unshaped links are left out (a warning names each). When none is left, only
    metrics.json is written, with fitted false and the runs left out: there is nothing to fit."""
    kept, unshaped = split_shaped(list(cfg.runs))
    for run in unshaped:
        log.warning("%s: emulated on unshaped links (emulation_shaped false); left out of the calibration", run)
    out = Path(cfg.out)
    if not kept:
        log.warning("no serve run with shaped links: nothing calibrated (run the serve stage as root)")
        (out / "topology.yaml").unlink(missing_ok=True)
        nothing = {"fitted": False, "runs_left_out_unshaped": unshaped}
        write_json_atomic(out / "metrics.json", nothing)
        return nothing
    runs = read_runs(kept)
    fit = fit_costs(stack_runs(runs))
    report, spearman = compare(runs, fit)
    topo = calibrated_topology(OmegaConf.to_container(cfg.topology, resolve=True), fit, str(cfg.name))
    write_text_atomic(out / "topology.yaml", OmegaConf.to_yaml(OmegaConf.create(topo)))
    write_atomic(out / "report.csv", lambda tmp: report.to_csv(tmp, index=False))
    write_atomic(out / "calibration.png", lambda tmp: plot_comparison(report, tmp))
    metrics = {"fitted": True, "runs_left_out_unshaped": unshaped, "spearman": spearman,
               "max_rel_error": float(report["rel_error"].max()),
               "mean_rel_error": float(report["rel_error"].mean()),
               **{k: v for k, v in asdict(fit).items() if v is not None}}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="calibrate")
@tracked_app("calibrate")
def main(cfg: DictConfig) -> AppRun:
    def work() -> AppResult:
        metrics = calibrate(cfg)
        if metrics["fitted"]:
            print(pd.read_csv(Path(cfg.out) / "report.csv").to_string(index=False))
        return AppResult(metrics, [cfg.out])

    return AppRun({"topology": cfg.topology.name}, work)
