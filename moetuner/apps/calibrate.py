"""moetuner-calibrate: fit the simulator's cost constants from moetuner-serve runs.

    moetuner-calibrate runs=[serve/contiguous,serve/eplb] topology=cpu_2x2 out=calib
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_atomic, write_json_atomic, write_text_atomic
from moetuner.serving.calibration import (CalibrationError, calibrated_topology, compare, fit_costs, plot_comparison,
                                          stack_runs)
from moetuner.tracking import tracked_run


def read_runs(dirs: list[str]) -> dict[str, pd.DataFrame]:
    """per_layer.csv of every serve run, keyed by the run folder's name (with its parent's when names
    repeat, e.g. eplb/rep0); emulated runs in target units."""
    runs = {}
    paths = [Path(d) for d in dirs]
    repeated = len({d.name for d in paths}) < len(paths)
    for d in paths:
        key = f"{d.parent.name}/{d.name}" if repeated else d.name
        if not (d / "per_layer.csv").is_file():
            raise CalibrationError(f"{d}: no per_layer.csv; give folders written by moetuner-serve")
        table = pd.read_csv(d / "per_layer.csv")
        metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
        runs[key] = undilate(table, metrics) if "dilation" in metrics else table
    return runs


def undilate(table: pd.DataFrame, metrics: dict) -> pd.DataFrame:
    """An emulated run's rows in the target's units: seconds / D, replayed bytes x the target's bytes
    per replayed byte (bf16 rows of `hidden` values for float32 rows of hidden / shape_scale)."""
    out = table.copy()
    seconds = [c for c in out.columns if c.endswith("_s")]
    out[seconds] = out[seconds] / float(metrics["dilation"])
    volumes = [c for c in out.columns if c.startswith("bytes_")]
    out[volumes] = out[volumes] * float(metrics["target_bytes_per_byte"])
    return out


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
