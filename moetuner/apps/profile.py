"""moetuner-profile: a trace's routing statistics, summary and heatmaps.

    moetuner-profile trace=traces/intent.safetensors out=profiles/intent step_tokens=1024
writes out/profile.npz, out/summary.json, out/load_heatmap.png, out/affinity_heatmap.png,
out/coactivation_heatmap.png.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_json_atomic
from moetuner.profiling import profile_figures as figures
from moetuner.profiling.stats import Profile, compute_profile, save_profile, summarize, trace_tags
from moetuner.trace import load_trace
from moetuner.tracking import AppResult, AppRun, tracked_app


def write_profile(profile: Profile, out: str | Path) -> tuple[dict[str, object], list[Path]]:
    """Profile, summary and figures in folder `out`; returns (summary, written paths)."""
    out = Path(out)
    summary = summarize(profile)
    paths = [save_profile(profile, out / "profile.npz"), write_json_atomic(out / "summary.json", summary),
             figures.load_heatmap(profile, out / "load_heatmap.png"),
             figures.coactivation_heatmap(profile, out / "coactivation_heatmap.png")]
    if profile.num_layers > 1:
        paths.append(figures.affinity_heatmap(profile, out / "affinity_heatmap.png"))
    return summary, paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="profile")
@tracked_app("profile")
def main(cfg: DictConfig) -> AppRun:
    trace = load_trace(cfg.trace)

    def work() -> AppResult:
        summary, paths = write_profile(compute_profile(trace, int(cfg.step_tokens)), cfg.out)
        return AppResult(summary["metrics"], paths)

    return AppRun(trace_tags(trace), work)
