"""moetuner-fit-hardware: fit the cost model's hardware constants to the published kernel tables.

    moetuner-fit-hardware out=results/fit_hardware
writes out/rows.csv (every published number, published vs simulated, fit or validation), out/summary.csv,
out/calibration.yaml (the topology `calibration` block, expert_model=efficiency, that the h800 presets
carry), out/calibration_{h100,h200,b200}.yaml and out/borrowed.csv (the other presets' blocks and where
each constant they do not fit comes from). See docs/hardware.md.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.hardware.classes import fit_everything, write_classes
from moetuner.hardware.fit import error_summary, write_fit
from moetuner.tracking import tracked_run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fit_hardware")
def main(cfg: DictConfig) -> None:
    with tracked_run("fit_hardware", cfg) as run:
        fit, classes = fit_everything(int(cfg.seed))
        command = f"moetuner-fit-hardware seed={cfg.seed}"
        paths = write_fit(fit, Path(cfg.out), command) + write_classes(classes, Path(cfg.out), command)
        run.log_metrics({f"max_abs_rel_error.{r.preset}.{r.gpu}.{r.table}.{r.split}": float(r.max)
                         for r in error_summary(fit.rows).itertuples()})
        for path in paths:
            run.log_artifact(path)
        print(fit.rows.to_string(index=False))


if __name__ == "__main__":
    main()
