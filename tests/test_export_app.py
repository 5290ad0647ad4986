"""moetuner-export (its pure function) and moetuner-solve's model_config: layouts from config.json, checked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from moetuner.apps.export import export_inputs, export_placement
from moetuner.apps.solve import config_layout
from moetuner.engines import EngineFileError, read_engine_file
from moetuner.model_layout import LayoutError, read_model_config
from moetuner.placement import save_placement
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
from test_solvers import random_trace, topology

V2_LITE = {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "num_hidden_layers": 27,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 8, "n_group": 1}


def write_config(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / f"config{len(changes)}.json"
    path.write_text(json.dumps({**V2_LITE, **changes}))
    return path


@pytest.fixture
def placement_file(tmp_path: Path) -> Path:
    """A solved placement of 26 MoE layers whose trace records no num_hidden_layers."""
    trace = dataclasses.replace(random_trace(64, 26, 8, 2), moe_layers=list(range(1, 27)))
    placement = solve_placement(PlacementProblem(trace, topology(1, 2), replicas=1), "greedy", {})
    return save_placement(placement, tmp_path / "greedy.json")


def test_export_with_a_config_writes_every_engine_file(tmp_path: Path, placement_file: Path) -> None:
    paths, block = export_placement(placement_file, tmp_path / "out", ["sglang", "vllm", "trtllm"],
                                    write_config(tmp_path))
    assert sorted(p.name for p in paths) == ["greedy.engines.json", "greedy.sglang.json", "greedy.trtllm-options.yaml",
                                             "greedy.trtllm.yaml", "greedy.vllm.jsonl"]
    assert json.loads((tmp_path / "out" / "greedy.engines.json").read_text()) == block
    assert "DeepseekV2ForCausalLM it silently ignores" in block["trtllm"]["warnings"][0]
    layout, phy2log = read_model_config(write_config(tmp_path)), json.loads(placement_file.read_text())
    for engine in ("sglang", "vllm", "trtllm"):
        rows = read_engine_file(engine, block[engine]["file"], layout, 8)
        assert np.array_equal(rows, phy2log["physical_to_logical_map"])


def test_export_without_any_layout_names_the_fix(tmp_path: Path, placement_file: Path) -> None:
    with pytest.raises(LayoutError, match="decoder layers are unknown .* give model_config="):
        export_inputs(placement_file)


def test_export_refuses_a_config_of_another_model_naming_both(tmp_path: Path, placement_file: Path) -> None:
    other = write_config(tmp_path, first_k_dense_replace=2)  # MoE layers 2..26: 25 of them
    with pytest.raises(LayoutError, match=r"placement .*greedy.json has 27 decoder layers, MoE layers \[1, .* but "
                                          r".*config1.json has 27, \[2, "):
        export_inputs(placement_file, other)
    with pytest.raises(LayoutError, match="8 experts, but .* and 16"):
        export_inputs(placement_file, write_config(tmp_path, n_routed_experts=16, num_hidden_layers=27))
    with pytest.raises(EngineFileError, match=r"unknown engine\(s\) \['tensorrt'\]"):
        export_placement(placement_file, tmp_path / "out", ["tensorrt"], write_config(tmp_path))


def test_solve_model_config_is_checked_against_the_trace(tmp_path: Path) -> None:
    trace = dataclasses.replace(random_trace(64, 26, 8, 2), moe_layers=list(range(1, 27)))
    assert config_layout(None, trace) is None
    assert config_layout(str(write_config(tmp_path)), trace).num_hidden_layers == 27
    with pytest.raises(LayoutError, match=r"trace random has 30 decoder layers.* but .*config1.json has 30"):
        config_layout(str(write_config(tmp_path, num_hidden_layers=30)), dataclasses.replace(
            trace, extra={"num_hidden_layers": "30"}, moe_layers=list(range(4, 30))))
