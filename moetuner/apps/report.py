"""moetuner-report: headline tables and sentences, the regime figure, figures and the results table of a study's
results folder, as report.md / report.html (see moetuner.report.build).

    moetuner-report results=results/default out=results/default/report
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.report.build import build_report
from moetuner.report.online_section import online_section
from moetuner.tracking import tracked_run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    notes = [f"Real data not found, skipped: {s}" for s in cfg.skipped] or ["All configured real data was found."]
    with tracked_run("report", cfg, tags={"results": str(cfg.results)}) as run:
        report = build_report(cfg.results, cfg.out, title=str(cfg.title or f"moetuner study: {Path(cfg.results).name}"),
                              notes=[*notes, *cfg.notes],
                              extra=[s for s in [online_section(cfg.results, cfg.out)] if s is not None])
        run.log_metrics(report.metrics)
        for path in report.files:
            run.log_artifact(path)
        print(report.headline)
        print(report.table.to_string(index=False))
