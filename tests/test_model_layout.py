"""Which decoder layers are MoE: each family's rule by hand, then against transformers' own modeling code
(tiny models built from the configs; a layer is MoE where it has a router, as moetuner-extract finds them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from moetuner.extraction.capture import find_routers
from moetuner.model_layout import (LayoutError, ModelLayout, check_record, layout_from_config_dict, read_model_config,
                                   resolve_layout)

TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=64)
MLA = dict(kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
# (config class, fields, expected MoE layers, expert count)
CASES = {
    "deepseek_v2": ("DeepseekV2Config", dict(MLA, num_hidden_layers=5, first_k_dense_replace=2, n_routed_experts=8,
                                               num_experts_per_tok=2, topk_method="greedy"), [2, 3, 4], 8),
    "deepseek_v3": ("DeepseekV3Config", dict(MLA, num_hidden_layers=4, first_k_dense_replace=3, n_routed_experts=8,
                                               num_experts_per_tok=2, n_group=2, topk_group=1), [3], 8),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
                                           num_experts=8, num_experts_per_tok=2, head_dim=16), [1, 5], 8),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=4, mlp_only_layers=[0], num_experts=8,
                                           num_experts_per_tok=2, shared_expert_intermediate_size=16), [1, 2, 3], 8),
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2), [0, 1, 2], 4),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2), [0, 1, 2], 8),
}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_moe_layers_by_hand_and_as_transformers_builds_them(model_type: str) -> None:
    class_name, fields, expected, experts = CASES[model_type]
    config = getattr(transformers, class_name)(**{**TINY, **fields})
    layout = layout_from_config_dict(config.to_dict(), model_type)
    assert list(layout.moe_layers) == expected and layout.num_experts == experts
    assert layout.num_hidden_layers == fields["num_hidden_layers"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert [i for i, _ in find_routers(model)] == expected


def test_deepseek_moe_layer_freq_and_n_group() -> None:
    """vLLM and SGLang also skip layers where i % moe_layer_freq != 0 (transformers ignores the key)."""
    layout = layout_from_config_dict({"model_type": "deepseek_v3", "num_hidden_layers": 8, "first_k_dense_replace": 1,
                                      "moe_layer_freq": 2, "n_routed_experts": 16, "n_group": 4})
    assert layout.moe_layers == (2, 4, 6) and layout.dense_layers == (0, 1, 3, 5, 7) and layout.n_group == 4
    assert layout_from_config_dict({"model_type": "olmoe", "num_hidden_layers": 2, "num_experts": 4}).n_group == 1


def test_read_model_config_takes_a_file_or_its_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "num_hidden_layers": 27,
        "first_k_dense_replace": 1, "n_routed_experts": 64, "n_group": 1}))
    for path in (tmp_path, tmp_path / "config.json"):
        layout = read_model_config(path)
        assert layout.moe_layers == tuple(range(1, 27)) and layout.architecture == "DeepseekV2ForCausalLM"
    with pytest.raises(LayoutError, match="no such file"):
        read_model_config(tmp_path / "absent.json")
    with pytest.raises(LayoutError, match="model_type 'llama' has no known MoE-layer rule"):
        layout_from_config_dict({"model_type": "llama", "num_hidden_layers": 2})


def test_a_record_that_disagrees_with_the_config_is_refused_naming_both() -> None:
    config = ModelLayout(num_hidden_layers=27, moe_layers=tuple(range(1, 27)), num_experts=64, source="v2.json")
    check_record(config, {"moe_layers": list(range(1, 27)), "num_experts": 64}, "trace t")  # no total: layers agree
    with pytest.raises(LayoutError, match=r"trace t has 27 decoder layers, MoE layers \[0, .*but v2.json has 27"):
        check_record(config, {"moe_layers": list(range(26)), "num_experts": 64}, "trace t")
    with pytest.raises(LayoutError, match="trace t has 28 decoder layers"):
        check_record(config, {"moe_layers": list(range(1, 27)), "num_hidden_layers": "28"}, "trace t")
    with pytest.raises(LayoutError, match="and 32 experts, but v2.json has .* and 64"):
        check_record(config, {"moe_layers": list(range(1, 27)), "num_experts": 32}, "trace t")
    with pytest.raises(LayoutError, match="give model_config="):
        resolve_layout({"moe_layers": [0, 1]}, None, 2, "placement p")
    assert resolve_layout({"moe_layers": [0, 1], "num_hidden_layers": 3}, None, 2, "p").dense_layers == (2,)


def test_malformed_layouts() -> None:
    with pytest.raises(LayoutError, match="no MoE layer"):
        ModelLayout(num_hidden_layers=2, moe_layers=())
    with pytest.raises(LayoutError, match=r"distinct ascending decoder indices in \[0, 2\)"):
        ModelLayout(num_hidden_layers=2, moe_layers=(1, 2))
