"""Router hooks: capture the experts each MoE router actually chose in a forward pass.

In every supported family the router is `model.model.layers[i].mlp.gate`, whose forward returns
`(router_logits [T, E], topk_weights [T, k], topk_indices [T, k])` with T = batch * seq_len rows in
row-major order. Keeping the returned indices is right for every routing rule (softmax top-k,
DeepSeek-V3's sigmoid + correction bias + group-limited choice); recomputing a top-k is not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SUPPORTED_MODEL_TYPES = {
    "mixtral": "Mixtral", "deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3",
    "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE",
}


class UnsupportedModelError(ValueError):
    """The checkpoint is not an MoE family whose routers moetuner can hook."""


def check_supported(config: Any) -> None:
    """Raise UnsupportedModelError unless `config.model_type` is a supported MoE family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['?'])}) is not "
            f"a supported MoE model; supported: {', '.join(SUPPORTED_MODEL_TYPES.values())} "
            f"(model_type {sorted(SUPPORTED_MODEL_TYPES)})")


def find_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder-layer index, router) of every MoE layer; dense layers have no `mlp.gate`."""
    check_supported(model.config)
    found = [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no MoE layer (no model.model.layers[i].mlp.gate)")
    return found


def model_shape(model: torch.nn.Module) -> dict[str, Any]:
    """Trace metadata read from the model: num_experts, top_k, moe_layers, num_hidden_layers, hidden_size,
    moe_intermediate_size, n_group (the config's expert-group count; 1 where the config has none, e.g.
    DeepSeek-V2-Lite, Qwen3-MoE)."""
    found = find_routers(model)
    gate = found[0][1]
    config = model.config
    return {
        "num_experts": int(gate.weight.shape[0]),
        "top_k": int(gate.top_k),
        "moe_layers": [i for i, _ in found],
        "num_hidden_layers": len(model.model.layers),
        "hidden_size": int(config.hidden_size),
        "moe_intermediate_size": int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
        "n_group": int(getattr(config, "n_group", None) or 1),
    }


class RouterCapture:
    """Forward hooks on all routers of `model`; `pop(mask)` returns the last forward's choices.

        with RouterCapture(model) as capture:
            model(input_ids=ids, attention_mask=mask)
            topk_ids, topk_weights = capture.pop(mask)   # [T, L, k] each, padding dropped
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = find_routers(model)
        self._ids: list[torch.Tensor | None] = [None] * len(self.routers)
        self._weights: list[torch.Tensor | None] = [None] * len(self.routers)
        self._handles: list[Any] = []

    def _hook(self, slot: int):
        def keep(_module: torch.nn.Module, _inputs: Any, outputs: tuple[torch.Tensor, ...]) -> None:
            _, self._weights[slot], self._ids[slot] = outputs
        return keep

    def __enter__(self) -> "RouterCapture":
        self._handles = [gate.register_forward_hook(self._hook(slot)) for slot, (_, gate) in enumerate(self.routers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def pop(self, attention_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(topk_ids int16 [T, L, k], topk_weights float32 [T, L, k]) of the real tokens of the last forward.

        `attention_mask` [B, S]: rows of the routers' [B * S, k] outputs where it is 0 are dropped.
        """
        assert all(t is not None for t in self._ids), "pop() needs a forward pass through every router"
        keep = attention_mask.reshape(-1).bool().cpu()
        ids = torch.stack([t.cpu() for t in self._ids], dim=1)[keep]
        weights = torch.stack([t.float().cpu() for t in self._weights], dim=1)[keep]
        self._ids = [None] * len(self.routers)
        self._weights = [None] * len(self.routers)
        return ids.to(torch.int16).numpy(), weights.numpy()
