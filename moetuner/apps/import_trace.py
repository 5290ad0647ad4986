"""moetuner-import: real routing recorded elsewhere -> a moetuner trace.

    moetuner-import format=esft path=ESFT/results/expert_scores/intent out=traces/intent.safetensors
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.importers import import_routing
from moetuner.profiling.stats import trace_sizes, trace_tags
from moetuner.trace import save_trace
from moetuner.tracking import AppResult, AppRun, tracked_app

MODEL_FIELDS = ("model", "hidden_size", "moe_intermediate_size", "dtype")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="import")
@tracked_app("import")
def main(cfg: DictConfig) -> AppRun:
    trace = import_routing(cfg.format, cfg.path, **{k: cfg[k] for k in MODEL_FIELDS}).with_weights(cfg.weights)

    def work() -> AppResult:
        save_trace(trace, cfg.out)
        return AppResult(trace_sizes(trace))

    return AppRun({**trace_tags(trace), "format": cfg.format}, work)
