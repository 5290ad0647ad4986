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
from moetuner.tracking import AppResult, AppRun, tracked_app

MODEL_FIELDS = ("model", "hidden_size", "moe_intermediate_size", "dtype", "n_group")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="import")
@tracked_app("import")
def main(cfg: DictConfig) -> AppRun:
    if cfg.format in LOAD_READERS:
        profile = import_loads(cfg.format, cfg.path, model=cfg.model, model_config=cfg.model_config,
                               load_balancer=cfg.load_balancer, step_tokens=cfg.step_tokens)

        def save_profile() -> AppResult:
            save_load_profile(profile, cfg.out)
            return AppResult({"steps": profile.num_steps, "layers": profile.num_layers,
                              "experts": profile.num_experts, "routed_tokens": float(profile.load.sum())})

        return AppRun({"model": profile.model, "dataset": profile.source, "format": cfg.format}, save_profile)
    trace = import_routing(cfg.format, cfg.path, **{k: cfg[k] for k in MODEL_FIELDS}).with_weights(cfg.weights)

    def work() -> AppResult:
        save_trace(trace, cfg.out)
        return AppResult(trace_sizes(trace))

    return AppRun({**trace_tags(trace), "format": cfg.format}, work)
