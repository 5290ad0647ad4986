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
from moetuner.tracking import tracked_run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="synth")
def main(cfg: DictConfig) -> None:
    spec = SynthSpec(**{f.name: cfg[f.name] for f in fields(SynthSpec)}).check()
    with tracked_run("synth", cfg, tags={"model": spec.model, "dataset": "synthetic"}) as run:
        trace = synthesize(spec)
        save_trace(trace, cfg.out)
        run.log_metrics(trace_sizes(trace))
        run.set_tags(trace_tags(trace))
