"""moetuner-split: whole sequences into a profile part and a held-out part.

    moetuner-split trace=traces/intent.safetensors out=splits/intent holdout_fraction=0.25 seed=0
writes out/profile.safetensors and out/heldout.safetensors.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.profiling.stats import trace_sizes, trace_tags
from moetuner.trace import load_trace, save_trace, split_by_sequence
from moetuner.tracking import AppResult, AppRun, tracked_app


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="split")
@tracked_app("split")
def main(cfg: DictConfig) -> AppRun:
    trace = load_trace(cfg.trace)

    def work() -> AppResult:
        parts = dict(zip(("profile", "heldout"), split_by_sequence(trace, cfg.holdout_fraction, cfg.seed)))
        for name, part in parts.items():
            save_trace(part, Path(cfg.out) / f"{name}.safetensors")
        return AppResult({k: v for name, part in parts.items() for k, v in trace_sizes(part, prefix=f"{name}_").items()})

    return AppRun(trace_tags(trace), work)
