"""Tiny offline MoE checkpoints, one per supported family, built deterministically.

Each preset is a transformers config (4 decoder layers, hidden 64, 8-16 experts) initialised with a
fixed seed, plus a byte-level BPE tokenizer trained on `stdlib-docs`; it is saved as a real
checkpoint and loaded back through `AutoModelForCausalLM.from_pretrained` like any other model.
Random routers route almost uniformly, so router weights are reshaped at build time
(`shape_routers`): expert rows get Zipf-like norms (popular experts) and each layer's router is
partly a permutation of the previous one (inter-layer affinity).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from moetuner import PROJECT_ROOT
from moetuner.extraction.capture import find_routers
from moetuner.extraction.text import stdlib_docstrings

DEFAULT_CACHE = PROJECT_ROOT / "results" / "models"
SEED = 0
VOCAB_SIZE = 512
TOKENIZER_DOCS = 500
SKEW = 1.0  # row-norm exponent: expert of rank r gets norm ~ (r + 1) ** -SKEW, times SCALE
SCALE = 4.0
AFFINITY = 0.6  # weight of the permuted previous router in each router
V3_BIAS_STD = 0.1  # std of DeepSeek-V3's e_score_correction_bias (nonzero so choice != plain top-k)

_COMMON = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, vocab_size=VOCAB_SIZE,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            num_key_value_heads=4)

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "tiny-deepseek-v2": ("DeepseekV2Config", dict(
        **_MLA, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, topk_method="greedy")),
    "tiny-deepseek-v3": ("DeepseekV3Config", dict(
        **_MLA, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True)),
    "tiny-qwen2-moe": ("Qwen2MoeConfig", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)),
    "tiny-qwen3-moe": ("Qwen3MoeConfig", dict(
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, head_dim=16)),
    "tiny-olmoe": ("OlmoeConfig", dict(num_experts=16, num_experts_per_tok=4)),
}


class PresetError(ValueError):
    """An unknown preset name."""


def preset_config(name: str) -> Any:
    """The transformers config object of preset `name`."""
    import transformers

    if name not in PRESETS:
        raise PresetError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    class_name, kwargs = PRESETS[name]
    return getattr(transformers, class_name)(**{**_COMMON, **kwargs})


@functools.cache
def train_tokenizer(vocab_size: int = VOCAB_SIZE, num_docs: int = TOKENIZER_DOCS) -> Any:
    """A byte-level BPE tokenizer trained on the first `num_docs` stdlib docstrings (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(islice(stdlib_docstrings(), num_docs), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@torch.no_grad()
def shape_routers(model: torch.nn.Module, gen: torch.Generator, skew: float = SKEW, scale: float = SCALE,
                  affinity: float = AFFINITY) -> None:
    """Give random routers realistic skew and inter-layer affinity, in place.

    Each router weight [E, H] becomes (1 - affinity) * own + affinity * (previous router, rows permuted),
    then its rows are rescaled to norms scale * (rank + 1) ** -skew in a random rank order.
    """
    previous: torch.Tensor | None = None
    for _, gate in find_routers(model):
        w = gate.weight
        num_experts = w.shape[0]
        mixed = w.clone() if previous is None else (1 - affinity) * w + affinity * previous[torch.randperm(
            num_experts, generator=gen)]
        norms = scale * (torch.randperm(num_experts, generator=gen) + 1.0) ** -skew
        w.copy_(mixed / mixed.norm(dim=1, keepdim=True) * norms[:, None])
        previous = w.clone()


def build_model(name: str, seed: int = SEED) -> torch.nn.Module:
    """Preset `name` with random weights from `seed`, routers shaped; DeepSeek-V3 bias nonzero."""
    from transformers import AutoModelForCausalLM

    config = preset_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    shape_routers(model, gen)
    for _, gate in find_routers(model):
        if hasattr(gate, "e_score_correction_bias"):
            with torch.no_grad():
                gate.e_score_correction_bias.copy_(V3_BIAS_STD * torch.randn(
                    gate.e_score_correction_bias.shape, generator=gen))
    return model.eval()


def build_preset(name: str, dest: str | os.PathLike[str] | None = None) -> Path:
    """Save preset `name` as a checkpoint folder `dest` (default results/models/<name>) and return it.

    Idempotent and atomic: a complete `dest` is reused; a new one is built in a temporary folder
    beside it and renamed into place (over an empty `dest`, e.g. one a workflow engine made).
    """
    dest = Path(dest) if dest is not None else DEFAULT_CACHE / name
    preset_config(name)  # fail fast on an unknown name
    if (dest / "config.json").is_file():  # only a complete build is ever renamed into place
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        build_model(name).save_pretrained(tmp)
        train_tokenizer().save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, dest)
    except OSError:
        if not (dest / "config.json").is_file():  # not a concurrent build that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
