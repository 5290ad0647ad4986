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
from moetuner.tracking import tracked_run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="split")
def main(cfg: DictConfig) -> None:
    trace = load_trace(cfg.trace)
    with tracked_run("split", cfg, tags=trace_tags(trace)) as run:
        parts = dict(zip(("profile", "heldout"), split_by_sequence(trace, cfg.holdout_fraction, cfg.seed)))
        for name, part in parts.items():
            save_trace(part, Path(cfg.out) / f"{name}.safetensors")
            run.log_metrics(trace_sizes(part, prefix=f"{name}_"))
