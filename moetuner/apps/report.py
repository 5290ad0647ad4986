"""moetuner-report: headline tables and sentences, the regime figure, figures and the results table of a study's
results folder, as report.md / report.html (see moetuner.report.build); phases.csv: the phases section's table
(moetuner.report.phase_section; header only without a `phases` section).

    moetuner-report results=results/default out=results/default/report
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_atomic
from moetuner.report.build import build_report
from moetuner.report.online_section import online_section
from moetuner.report.phase_section import phase_section, phase_sentences, phase_table
from moetuner.tracking import AppResult, AppRun, tracked_app


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
@tracked_app("report")
def main(cfg: DictConfig) -> AppRun:
    notes = [f"Real data not found, skipped: {s}" for s in cfg.skipped] or ["All configured real data was found."]

    def work() -> AppResult:
        phases = phase_table(cfg.results)
        report = build_report(cfg.results, cfg.out, title=str(cfg.title or f"moetuner study: {Path(cfg.results).name}"),
                              notes=[*notes, *cfg.notes],
                              extra=[s for s in [phase_section(phases), online_section(cfg.results, cfg.out)]
                                     if s is not None],
                              main_seed=int(cfg.split_seed), headline_notes=phase_sentences(phases))
        phases_csv = write_atomic(Path(cfg.out) / "phases.csv", lambda tmp: phases.to_csv(tmp, index=False))
        print(report.headline)
        print(report.table.to_string(index=False))
        return AppResult(report.metrics, [*report.files, phases_csv])

    return AppRun({"results": str(cfg.results)}, work)
