"""Extraction: captured experts equal the routing the model computes, padding, resume, errors, the app."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moetuner.extraction import extract as extract_mod
from moetuner.extraction.capture import UnsupportedModelError
from moetuner.extraction.checkpoints import load_model
from moetuner.extraction.extract import ExtractionError, ExtractSpec, extract_trace
from moetuner.extraction.presets import PRESETS, build_preset
from moetuner.trace import load_trace

DOCS = [
    (0, "Return the number of items in a container."),
    (2, "Open file and return a stream. Raise OSError upon failure."),
    (3, "The quick brown fox jumps over the lazy dog; then it sorts a list in place."),
    (5, "x"),
    (7, "Decode the bytes using the codec registered for encoding, and split the lines."),
]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny preset, built once per session as a real checkpoint folder."""
    root = tmp_path_factory.mktemp("models")
    return {name: build_preset(name, root / name) for name in PRESETS}


@pytest.fixture(scope="session")
def loaded(checkpoints: dict[str, Path]) -> dict[str, tuple]:
    return {name: load_model(str(path)) for name, path in checkpoints.items()}


def run(model_tok: tuple, out: Path, docs=DOCS, **spec) -> extract_mod.ExtractResult:
    model, tok = model_tok
    return extract_trace(model, lambda text: tok(text)["input_ids"], tok.pad_token_id, docs, out,
                         ExtractSpec(**spec), model_name="tiny", source="test")


def expected_choice(model: torch.nn.Module, logits: np.ndarray, layer: int) -> np.ndarray:
    """Experts the family's routing rule picks from raw router logits [T, E], recomputed here. [T, k]"""
    cfg = model.config
    k = cfg.num_experts_per_tok
    if cfg.model_type != "deepseek_v3":  # softmax then top-k (DeepSeek-V2 greedy included)
        return np.argsort(-logits, axis=1, kind="stable")[:, :k]
    gate = model.model.layers[layer].mlp.gate
    scores = 1 / (1 + np.exp(-logits.astype(np.float64))) + gate.e_score_correction_bias.numpy()
    T, E = scores.shape
    groups = scores.reshape(T, cfg.n_group, E // cfg.n_group)
    group_score = np.sort(groups, axis=2)[:, :, -2:].sum(axis=2)  # [T, G] sum of each group's top-2
    keep = np.argsort(-group_score, axis=1)[:, :cfg.topk_group]
    allowed = np.zeros_like(group_score, dtype=bool)
    np.put_along_axis(allowed, keep, True, axis=1)
    masked = np.where(np.repeat(allowed, E // cfg.n_group, axis=1), scores, -np.inf)
    return np.argsort(-masked, axis=1)[:, :k]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_captured_ids_equal_recomputed_routing(name: str, loaded, tmp_path: Path) -> None:
    model, tok = loaded[name]
    trace = run(loaded[name], tmp_path / "t.safetensors", token_budget=4096).trace
    assert trace.moe_layers == [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    assert (trace.moe_layers[0] == 1) == name.startswith("tiny-deepseek")  # first_k_dense_replace=1
    assert trace.n_group == (model.config.n_group if name == "tiny-deepseek-v3" else 1) and \
        trace.extra["n_group"] == str(trace.n_group)  # the config's expert groups (V3 preset: 4)
    plain_topk_agrees = []
    for seq_id, text in DOCS:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits  # L x [S, E]
        got = np.sort(trace.topk_ids[trace.seq_ids == seq_id], axis=2)  # [S, L, k]
        assert got.shape[0] == ids.shape[1]
        for slot, layer in enumerate(trace.moe_layers):
            want = np.sort(expected_choice(model, logits[slot].float().numpy(), layer), axis=1)
            np.testing.assert_array_equal(got[:, slot], want, err_msg=f"{name} layer {layer} seq {seq_id}")
            top = np.sort(np.argsort(-logits[slot].float().numpy(), axis=1)[:, :want.shape[1]], axis=1)
            plain_topk_agrees.append((top == want).all(axis=1))
    if name == "tiny-deepseek-v3":  # the correction bias and groups change the choice for many tokens
        assert np.concatenate(plain_topk_agrees).mean() < 0.9


def test_padding_is_excluded(loaded, tmp_path: Path) -> None:
    """One padded batch gives exactly the ids of one-sequence-per-batch runs (no padding)."""
    padded = run(loaded["tiny-qwen3-moe"], tmp_path / "a.safetensors", token_budget=10_000)
    single = run(loaded["tiny-qwen3-moe"], tmp_path / "b.safetensors", token_budget=1)
    assert padded.metrics["batches"] == 1 and single.metrics["batches"] == len(DOCS)
    tok = loaded["tiny-qwen3-moe"][1]
    assert padded.trace.num_tokens == sum(len(tok(t)["input_ids"]) for _, t in DOCS)
    np.testing.assert_array_equal(np.sort(padded.trace.topk_ids, 2), np.sort(single.trace.topk_ids, 2))
    np.testing.assert_array_equal(padded.trace.seq_ids, single.trace.seq_ids)


def test_resume_after_kill_equals_uninterrupted_run(loaded, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model_tok = loaded["tiny-mixtral"]
    reference = run(model_tok, tmp_path / "ref.safetensors", token_budget=40)
    out = tmp_path / "killed.safetensors"
    shards = tmp_path / "killed.safetensors.shards"
    real_write = extract_mod.write_shard
    written = []

    def write_then_die(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(extract_mod, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(model_tok, out, token_budget=40)
    assert not out.exists() and len(list(shards.glob("shard_*.safetensors"))) == 2
    (shards / "shard_00001.safetensors").write_bytes(b"truncated")  # a shard cut short is redone
    monkeypatch.setattr(extract_mod, "write_shard", real_write)
    resumed = run(model_tok, out, token_budget=40)
    assert resumed.metrics["resumed_batches"] == 1
    assert resumed.metrics["batches"] == reference.metrics["batches"] > 3
    assert not shards.exists()
    final, ref = load_trace(out), load_trace(tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(final.topk_ids, ref.topk_ids)
    np.testing.assert_array_equal(final.topk_weights, ref.topk_weights)
    np.testing.assert_array_equal(final.seq_ids, ref.seq_ids)


def test_shards_from_other_settings_are_not_reused(loaded, tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    (tmp_path / "t.safetensors.shards").mkdir()
    other = run(loaded["tiny-mixtral"], tmp_path / "other.safetensors", token_budget=10_000, seq_len=4)
    os.replace(tmp_path / "other.safetensors", tmp_path / "t.safetensors.shards" / "shard_00000.safetensors")
    result = run(loaded["tiny-mixtral"], out, token_budget=10_000)
    assert result.metrics["resumed_batches"] == 0 and other.trace.num_tokens < result.trace.num_tokens


def test_limits_and_weights(loaded, tmp_path: Path) -> None:
    res = run(loaded["tiny-olmoe"], tmp_path / "t.safetensors", max_sequences=2, weights="none")
    assert res.trace.sequences.tolist() == [0, 2] and res.trace.topk_weights is None
    res = run(loaded["tiny-olmoe"], tmp_path / "t.safetensors", weights="float32")
    w = res.trace.topk_weights
    assert w.dtype == np.float32 and (w > 0).all()
    assert res.metrics["tokens"] == res.trace.num_tokens and res.metrics["sequences"] == len(DOCS)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*supported: Mixtral, DeepSeek-V2"):
        load_model(str(tmp_path))


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExtractionError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


@pytest.mark.slow
def test_app_writes_trace_and_logs_to_mlflow(checkpoints, tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(t for _, t in DOCS) + "\n")
    out = tmp_path / "traces" / "app.safetensors"
    exe = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).parents[1] / ".venv")) / "bin" / "moetuner-extract"
    subprocess.run([str(exe), f"model={checkpoints['tiny-deepseek-v3']}", f"dataset={text}", f"out={out}",
                    "token_budget=256"], check=True, capture_output=True, text=True)
    trace = load_trace(out)
    assert trace.source == str(text) and trace.num_experts == 16 and trace.moe_layers == [1, 2, 3]
    assert (out.parent / ".hydra" / out.name / "config.yaml").is_file()
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["moetuner"])
    row = runs.iloc[0]
    assert row["tags.app"] == "extract" and row["params.token_budget"] == "256"
    assert row["metrics.tokens"] == trace.num_tokens and row["metrics.sequences"] == len(DOCS)
    assert row["metrics.layers"] == 3 and row["metrics.load_max_over_mean"] >= 1.0
