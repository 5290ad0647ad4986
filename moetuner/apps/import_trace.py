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
from moetuner.tracking import tracked_run

MODEL_FIELDS = ("model", "hidden_size", "moe_intermediate_size", "dtype", "n_group")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="import")
def main(cfg: DictConfig) -> None:
    trace = import_routing(cfg.format, cfg.path, **{k: cfg[k] for k in MODEL_FIELDS}).with_weights(cfg.weights)
    with tracked_run("import", cfg, tags={**trace_tags(trace), "format": cfg.format}) as run:
        save_trace(trace, cfg.out)
        run.log_metrics(trace_sizes(trace))
