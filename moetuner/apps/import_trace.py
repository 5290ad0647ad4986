"""moetuner-import: real routing recorded elsewhere -> a moetuner trace; an engine's load dump -> a load profile.

    moetuner-import format=esft path=ESFT/results/expert_scores/intent out=traces/intent.safetensors
    moetuner-import format=sglang_stat path=expert_distribution_recorder_1700000000.0.pt model=M out=loads.safetensors
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.importers import import_loads, import_routing
from moetuner.importers.load_dumps import LOAD_READERS
from moetuner.load_profile import save_load_profile
from moetuner.profiling.stats import trace_sizes, trace_tags
from moetuner.trace import save_trace
from moetuner.tracking import tracked_run

MODEL_FIELDS = ("model", "hidden_size", "moe_intermediate_size", "dtype", "n_group")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="import")
def main(cfg: DictConfig) -> None:
    if cfg.format in LOAD_READERS:
        profile = import_loads(cfg.format, cfg.path, model=cfg.model, model_config=cfg.model_config,
                               load_balancer=cfg.load_balancer, step_tokens=cfg.step_tokens)
        tags = {"model": profile.model, "dataset": profile.source, "format": cfg.format}
        with tracked_run("import", cfg, tags=tags) as run:
            save_load_profile(profile, cfg.out)
            run.log_metrics({"steps": profile.num_steps, "layers": profile.num_layers,
                             "experts": profile.num_experts, "routed_tokens": float(profile.load.sum())})
        return
    trace = import_routing(cfg.format, cfg.path, **{k: cfg[k] for k in MODEL_FIELDS}).with_weights(cfg.weights)
    with tracked_run("import", cfg, tags={**trace_tags(trace), "format": cfg.format}) as run:
        save_trace(trace, cfg.out)
        run.log_metrics(trace_sizes(trace))
