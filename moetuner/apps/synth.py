"""moetuner-synth: a synthetic trace with controlled statistics.

    moetuner-synth out=traces/synth.safetensors num_tokens=100000 num_layers=58 num_experts=256 top_k=8
"""

from __future__ import annotations

from dataclasses import fields

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.profiling.stats import trace_sizes, trace_tags
from moetuner.synth import SynthSpec, synthesize
from moetuner.trace import save_trace
from moetuner.tracking import AppResult, AppRun, tracked_app


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="synth")
@tracked_app("synth")
def main(cfg: DictConfig) -> AppRun:
    spec = SynthSpec(**{f.name: cfg[f.name] for f in fields(SynthSpec)}).check()

    def work() -> AppResult:
        trace = synthesize(spec)
        save_trace(trace, cfg.out)
        return AppResult(trace_sizes(trace), tags=trace_tags(trace))

    return AppRun({"model": spec.model, "dataset": "synthetic"}, work)
