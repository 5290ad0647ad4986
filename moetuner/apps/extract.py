"""moetuner-extract: record which experts each router chose, for every token of a text source.

    moetuner-extract model=tiny-deepseek-v3 dataset=stdlib-docs out=traces/tiny-v3.safetensors max_tokens=20000
"""

from __future__ import annotations

from dataclasses import fields

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.extraction.checkpoints import load_model
from moetuner.extraction.extract import ExtractSpec, extract_trace
from moetuner.extraction.registry import resolve_dataset, resolve_model
from moetuner.extraction.text import documents, source_label
from moetuner.profiling.stats import expert_load
from moetuner.tracking import AppResult, AppRun, tracked_app


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="extract")
@tracked_app("extract")
def main(cfg: DictConfig) -> AppRun:
    spec = ExtractSpec(**{f.name: cfg[f.name] for f in fields(ExtractSpec)}).check()
    data = resolve_dataset(cfg.dataset, split=cfg.split, text_field=cfg.text_field, config_name=cfg.dataset_config)

    def work() -> AppResult:
        model, tokenizer = load_model(resolve_model(cfg.model, cfg.model_cache), cfg.dtype, cfg.device)
        docs = documents(data["source"], data["split"], data["text_field"], data["config_name"])
        result = extract_trace(model, lambda text: tokenizer(text)["input_ids"], tokenizer.pad_token_id or 0,
                               docs, cfg.out, spec, model_name=cfg.model,
                               source=source_label(data["source"], data["split"]))
        load = expert_load(result.trace.topk_ids, result.trace.num_experts)  # [L, E]
        return AppResult(result.metrics, series={"load_max_over_mean": [float(row.max() / row.mean()) for row in load]})

    return AppRun({"model": cfg.model, "dataset": cfg.dataset}, work)
