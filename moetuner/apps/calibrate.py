"""moetuner-calibrate: fit the simulator's cost constants from moetuner-serve runs.

    moetuner-calibrate runs=[serve/contiguous,serve/eplb] topology=cpu_2x2 out=calib
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_atomic, write_json_atomic, write_text_atomic
from moetuner.serving.calibration import (calibrated_topology, compare, fit_costs, plot_comparison,
                                          read_runs, stack_runs)
from moetuner.tracking import tracked_run


def calibrate(cfg: DictConfig) -> dict:
    """Fit, write topology.yaml / report.csv / calibration.png / metrics.json under cfg.out; return metrics."""
    runs = read_runs(list(cfg.runs))
    fit = fit_costs(stack_runs(runs))
    report, spearman = compare(runs, fit)
    out = Path(cfg.out)
    topo = calibrated_topology(OmegaConf.to_container(cfg.topology, resolve=True), fit, str(cfg.name))
    write_text_atomic(out / "topology.yaml", OmegaConf.to_yaml(OmegaConf.create(topo)))
    write_atomic(out / "report.csv", lambda tmp: report.to_csv(tmp, index=False))
    write_atomic(out / "calibration.png", lambda tmp: plot_comparison(report, tmp))
    metrics = {"spearman": spearman, "max_rel_error": float(report["rel_error"].max()),
               "mean_rel_error": float(report["rel_error"].mean()),
               **{k: v for k, v in asdict(fit).items() if v is not None}}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="calibrate")
def main(cfg: DictConfig) -> None:
    with tracked_run("calibrate", cfg, tags={"topology": cfg.topology.name}) as run:
        metrics = calibrate(cfg)
        run.log_metrics(metrics)
        run.log_artifact(cfg.out)
    print(pd.read_csv(Path(cfg.out) / "report.csv").to_string(index=False))
