"""Tiny presets: deterministic, idempotent atomic builds, shaped routers, loadable checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetuner.extraction.capture import find_routers, model_shape
from moetuner.extraction.checkpoints import load_model
from moetuner.extraction.presets import SCALE, SKEW, PresetError, build_model, build_preset
from moetuner.extraction.registry import resolve_dataset, resolve_model


def test_build_is_deterministic() -> None:
    a, b = build_model("tiny-olmoe").state_dict(), build_model("tiny-olmoe").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_router_rows_have_zipf_norms() -> None:
    """Each router's row norms are a permutation of SCALE * (rank + 1) ** -SKEW."""
    for _, gate in find_routers(build_model("tiny-qwen3-moe")):
        norms = gate.weight.norm(dim=1).sort(descending=True).values
        want = SCALE * (torch.arange(gate.weight.shape[0]) + 1.0) ** -SKEW
        torch.testing.assert_close(norms, want)


def test_build_preset_is_idempotent_and_reloads_v3_bias(tmp_path: Path) -> None:
    (tmp_path / "v3").mkdir()  # an empty folder (as a workflow engine may make) is built into
    dest = build_preset("tiny-deepseek-v3", tmp_path / "v3")
    stamp = (dest / "config.json").stat().st_mtime_ns
    assert build_preset("tiny-deepseek-v3", dest) == dest
    assert (dest / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["v3"]  # no temporary folder left behind
    model, tokenizer = load_model(str(dest))
    built = build_model("tiny-deepseek-v3")
    for (_, loaded_gate), (_, built_gate) in zip(find_routers(model), find_routers(built)):
        assert loaded_gate.e_score_correction_bias.abs().sum() > 0
        assert torch.equal(loaded_gate.e_score_correction_bias, built_gate.e_score_correction_bias)
    assert model_shape(model) == {"num_experts": 16, "top_k": 4, "moe_layers": [1, 2, 3], "num_hidden_layers": 4, "n_group": 4,
                                  "hidden_size": 64, "moe_intermediate_size": 32}
    assert tokenizer.decode(tokenizer("Return a list.")["input_ids"]) == "Return a list."


def test_unknown_preset_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match="tiny-mixtral"):
        build_preset("tiny-gpt5", tmp_path / "x")


def test_registry_resolves_names_and_passes_paths_through(tmp_path: Path) -> None:
    assert resolve_model("tiny-olmoe", tmp_path) == str(tmp_path / "tiny-olmoe")
    assert (tmp_path / "tiny-olmoe" / "config.json").is_file()
    assert resolve_model("/ckpt/my-moe") == "/ckpt/my-moe"
    assert resolve_model("deepseek-v2-lite") == "deepseek-ai/DeepSeek-V2-Lite"
    assert resolve_dataset("wikitext")["split"] == "test"
    assert resolve_dataset("wikitext", split="validation")["split"] == "validation"
    assert resolve_dataset("data.jsonl", text_field=None) == {
        "source": "data.jsonl", "split": "train", "text_field": "text", "config_name": None}
