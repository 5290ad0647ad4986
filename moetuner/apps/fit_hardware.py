"""moetuner-fit-hardware: fit the cost model's hardware constants to the published H800 kernel tables.

    moetuner-fit-hardware out=results/fit_hardware
writes out/rows.csv (every published number, published vs simulated, fit or validation), out/summary.csv
and out/calibration.yaml: the topology `calibration` block (expert_model=efficiency) that the h800
presets carry. See docs/hardware.md.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.costmodel.hardware_fit import fit_published, write_fit
from moetuner.tracking import AppResult, AppRun, tracked_app


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fit_hardware")
@tracked_app("fit_hardware")
def main(cfg: DictConfig) -> AppRun:
    def work() -> AppResult:
        fit = fit_published(int(cfg.seed))
        paths = write_fit(fit, Path(cfg.out), f"moetuner-fit-hardware seed={cfg.seed}")
        errors = fit.rows.assign(split=fit.rows["used_in_fit"].map({True: "fit", False: "validation"}))
        print(fit.rows.to_string(index=False))
        return AppResult({f"max_abs_rel_error.{t}.{s}": float(v) for (t, s), v in
                          errors.groupby(["table", "split"])["rel_error"].apply(lambda e: e.abs().max()).items()},
                         paths)

    return AppRun({}, work)


if __name__ == "__main__":
    main()
