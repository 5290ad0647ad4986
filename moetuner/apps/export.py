"""moetuner-export: a placement -> the files SGLang, vLLM and TensorRT-LLM load, with each engine's flags.

    moetuner-export placement=results/eplb.json model_config=DeepSeek-V2-Lite/config.json out=engine_files
writes out/<stem>.sglang.json, out/<stem>.vllm.jsonl, out/<stem>.trtllm.yaml (+ <stem>.trtllm-options.yaml)
and out/<stem>.engines.json (flags, notes, and warnings where an engine would ignore its file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_json_atomic
from moetuner.engines import ENGINES, check_engines, export_engine_files
from moetuner.model_layout import ModelLayout, read_model_config, resolve_layout
from moetuner.placement import Placement, PlacementError, load_placement
from moetuner.tracking import tracked_run


def export_inputs(placement_path: str | os.PathLike[str], model_config: str | os.PathLike[str] | None = None,
                  engines: Sequence[str] = ENGINES) -> tuple[Placement, ModelLayout, int]:
    """(placement, its model's layout, expert count), or an error naming the fix.

    The model's decoder layers come from `model_config` (checked against what the placement records) or
    from the placement's record; `num_experts` from the placement's record (`moetuner-solve` writes it).
    """
    check_engines(engines)
    placement = load_placement(placement_path)
    config = None if model_config is None else read_model_config(model_config)
    layout = resolve_layout(placement.extra, config, placement.num_layers, f"placement {placement_path}")
    num_experts = placement.extra.get("num_experts", layout.num_experts)
    if num_experts is None:
        raise PlacementError(f"{placement_path}: records no num_experts; give model_config=PATH/config.json")
    return placement, layout, int(num_experts)


def export_placement(placement_path: str | os.PathLike[str], out: str | os.PathLike[str], engines: list[str],
                     model_config: str | os.PathLike[str] | None = None) -> tuple[list[Path], dict[str, Any]]:
    """Write the engine files of a placement JSON into folder `out`; return (paths, engines block)."""
    placement, layout, num_experts = export_inputs(placement_path, model_config, engines)
    stem = Path(out) / Path(placement_path).stem
    files, block = export_engine_files(placement, num_experts, layout, stem, engines)
    record = write_json_atomic(f"{stem}.engines.json", block)
    return [*files.values(), record], block


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    engines = [str(e) for e in cfg.engines]
    export_inputs(cfg.placement, cfg.model_config, engines)  # bad inputs fail here, before a run is opened
    with tracked_run("export", cfg, tags={"engines": ",".join(engines)}) as run:
        paths, _ = export_placement(cfg.placement, cfg.out, engines, cfg.model_config)
        for path in paths:
            run.log_artifact(path)
