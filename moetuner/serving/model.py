"""Model mode: a Hugging Face MoE checkpoint served expert-parallel.

Dense parts (attention, norms, router, shared experts) stay on every rank (data-parallel attention);
each MoE block keeps its own router and gets an `EPExperts` in place of `mlp.experts` that holds
only this rank's slots (replicas and empty slots included) and exchanges tokens with the others.
Every rank checks its EP logits against the unmodified single-process model on the same prompts.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from moetuner.placement import expert_location
from moetuner.serving.ep_moe import LayerTimes, choose_slots, ep_layer
from moetuner.serving.experts import LocalExperts
from moetuner.serving.measure import Cluster, layer_row


class ModelModeError(ValueError):
    """The checkpoint cannot be served expert-parallel; the message says why."""


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks (an `mlp` with a router `gate` and fused `experts`), in layer order."""
    blocks = [layer.mlp for layer in model.model.layers
              if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]
    if not blocks:
        raise ModelModeError("the model has no MoE blocks (layers[i].mlp.gate and .experts)")
    for block in blocks:
        if not hasattr(block.experts, "gate_up_proj"):
            raise ModelModeError(f"{type(block.experts).__name__} has no fused gate_up_proj/down_proj "
                                 f"weights; only transformers-5 fused experts are supported")
    return blocks


def load_model(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def moe_shape(path: str) -> tuple[int, int]:
    """(MoE layers, routed experts) of a checkpoint, without loading its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    blocks = moe_blocks(model)
    return len(blocks), int(blocks[0].experts.gate_up_proj.shape[0])


class EPExperts(nn.Module):
    """Drop-in for a fused experts module: forward(hidden [T, H], topk_index, topk_weights) -> [T, H]."""

    def __init__(self, experts: nn.Module, phy2log_row: np.ndarray, cluster: Cluster, rank: int,
                 record: list[LayerTimes]) -> None:
        super().__init__()
        num_experts = experts.gate_up_proj.shape[0]
        self.spr = len(phy2log_row) // cluster.world
        mine = phy2log_row[rank * self.spr:(rank + 1) * self.spr]
        held = torch.from_numpy(np.where(mine >= 0, mine, 0))  # empty slots: never addressed
        self.local = LocalExperts(experts.gate_up_proj.detach()[held].clone(),
                                  experts.down_proj.detach()[held].clone(), experts.act_fn)
        location = expert_location(phy2log_row[None], cluster.world, num_experts)
        self.log2phy, self.counts = torch.from_numpy(location.log2phy[0]), torch.from_numpy(location.count[0])
        self.cluster, self.rank, self.record = cluster, rank, record

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        token = torch.arange(n) * self.cluster.world + self.rank  # data-parallel: rank r holds every W-th token
        slots = choose_slots(top_k_index, token, self.log2phy, self.counts)
        home = torch.full((n,), self.rank, dtype=torch.long)
        part, tok, times = ep_layer(hidden, torch.arange(n), slots, top_k_weights, self.spr, home,
                                    self.local, self.cluster.world, self.rank)
        self.record.append(times)
        return torch.zeros_like(hidden).index_add_(0, tok, part.to(hidden.dtype))


def greedy_logits(model: nn.Module, prompts: torch.Tensor, steps: int,
                  forced: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill then `steps` cached decode steps; the next tokens are `forced` when given, else greedy.

    Returns (last-position logits [B, V] per forward, tokens fed at each decode step [B, 1]).
    """
    logits, fed = [], []
    with torch.no_grad():
        out = model(input_ids=prompts, use_cache=True)
        for step in range(steps + 1):
            logits.append(out.logits[:, -1].float())
            if step == steps:
                break
            nxt = forced[step] if forced is not None else out.logits[:, -1:].argmax(-1)
            fed.append(nxt)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return logits, fed


def run_model(cfg: DictConfig, cluster: Cluster, rank: int, phy2log: np.ndarray) -> tuple[list, int, float, dict]:
    """Serve the checkpoint EP on this rank; compare logits with the single-process model."""
    settings = cfg.model
    model = load_model(settings.path)
    blocks = moe_blocks(model)
    if len(blocks) != phy2log.shape[0]:
        raise ModelModeError(f"placement has {phy2log.shape[0]} layers, the model {len(blocks)} MoE blocks")
    per_rank = int(settings.prompts_per_rank)
    gen = torch.Generator().manual_seed(int(settings.seed))
    prompts = torch.randint(model.config.vocab_size, (cluster.world * per_rank, int(settings.prompt_len)),
                            generator=gen)[rank * per_rank:(rank + 1) * per_rank]
    ref_logits, fed = greedy_logits(model, prompts, int(settings.decode_steps))
    records: list[list[LayerTimes]] = [[] for _ in blocks]
    for layer, block in enumerate(blocks):
        block.experts = EPExperts(block.experts, phy2log[layer], cluster, rank, records[layer])
    torch.distributed.barrier()
    t0 = time.perf_counter()
    ep_logits, _ = greedy_logits(model, prompts, int(settings.decode_steps), forced=fed)
    wall = time.perf_counter() - t0
    diff = max(float((a - b).abs().max()) for a, b in zip(ep_logits, ref_logits))
    rows = [layer_row(step, layer, rank, cluster, times)
            for layer, calls in enumerate(records) for step, times in enumerate(calls)]
    tokens = cluster.world * per_rank * (int(settings.prompt_len) + int(settings.decode_steps))
    return rows, tokens, wall, {"dataflow": "dispatch_combine", "logits_match": diff <= float(settings.atol),
                                "max_abs_diff": diff}
