"""Trace replay: real routing drives real all-to-all traffic and real expert GEMMs (random weights).

The same conventions as `moetuner.costmodel.simulator`: every step takes `step_tokens` consecutive trace
tokens; token j of a step has home rank j % W; `dispatch` picks the replicas (dynamic: replica
j % count of each expert; static, lp, lp_comm: the simulator's choose_slots for the whole step).
  dispatch_combine: every layer, tokens go from their home rank to their experts' ranks and back home;
  hierarchical:     the same route, relayed as DeepEP does across nodes: one copy per (token, node) to
                    the rank of the sender's local rank there, which forwards it inside its node;
  expert_to_expert: layer l's outputs gather on the rank of the token's primary expert of layer l
                    (largest gate weight, else the first id), which dispatches it to layer l+1;
                    the last layer combines back home.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moetuner.costmodel.cost import CostModel
from moetuner.costmodel.replicas import choose_step_slots
from moetuner.costmodel.settings import check_dataflow, check_dispatch
from moetuner.placement import expert_location
from moetuner.serving.ep_moe import ExpertFn, choose_slots, ep_layer
from moetuner.serving.experts import random_experts
from moetuner.serving.measure import Cluster, layer_row
from moetuner.trace import Trace, primary_column

class ReplayError(ValueError):
    """The replay settings do not fit the trace or placement."""


@dataclass(frozen=True)
class ReplaySettings:
    step_tokens: int = 512
    shape_scale: int = 8  # hidden and moe_intermediate are divided by this (CPU)
    dataflow: str = "dispatch_combine"
    warmup_steps: int = 1
    max_steps: int | None = None
    seed: int = 0
    dispatch: str = "dynamic"  # moetuner.costmodel.settings.DISPATCHES

    def check(self) -> None:
        check_dataflow(self.dataflow, ReplayError, "replay.dataflow")
        check_dispatch(self.dispatch, ReplayError, "replay.dispatch")
        if self.step_tokens < 1 or self.shape_scale < 1:
            raise ReplayError(f"step_tokens={self.step_tokens} and shape_scale={self.shape_scale} must be >= 1")


def replay_settings(replay: Mapping[str, Any]) -> ReplaySettings:
    """The `replay` config block as ReplaySettings (check_delivery is the worker's own switch), checked."""
    settings = ReplaySettings(**{k: v for k, v in replay.items() if k != "check_delivery"})
    settings.check()
    return settings


def step_ranges(num_tokens: int, settings: ReplaySettings) -> Iterator[tuple[int, int, int]]:
    """(step, first token, end token) of every full step (a partial last step is dropped)."""
    steps = num_tokens // settings.step_tokens
    if settings.max_steps is not None:
        steps = min(steps, settings.max_steps + settings.warmup_steps)
    if steps <= settings.warmup_steps:
        raise ReplayError(f"{num_tokens} tokens make {steps} step(s) of step_tokens={settings.step_tokens}, "
                          f"not more than warmup_steps={settings.warmup_steps}; lower replay.step_tokens "
                          f"or replay.warmup_steps, or replay a longer trace")
    for step in range(steps):
        yield step, step * settings.step_tokens, (step + 1) * settings.step_tokens


def replay(trace: Trace, phy2log: np.ndarray, settings: ReplaySettings, cluster: Cluster, rank: int,
           delivered: np.ndarray | None = None, expert_fn: ExpertFn | None = None,
           on_step: Callable[[], None] | None = None, cost: CostModel | None = None
           ) -> tuple[list[dict], int, float]:
    """Replay `trace` through EP layers placed by phy2log [L, P] on this rank.

    cost: the topology's cost model, which dispatch lp_comm needs (static and lp use only the layout).

    delivered: optional int [T, L, E], incremented for every (token, layer, expert) computed here.
    expert_fn: used for every layer instead of random experts (the emulation's timed experts);
    on_step() is called when each step starts, after the barrier (the emulation's clock).
    Returns (per-layer rows of measured steps, measured tokens, measured wall seconds).
    """
    settings.check()
    world = cluster.world
    if cost is None and settings.dispatch == "lp_comm":
        raise ReplayError("replay.dispatch=lp_comm needs the topology's cost model (replay(..., cost=...))")
    if cost is None:  # the GPU layout is all static and lp need
        node = np.arange(world) // cluster.ranks_per_node
        cost = CostModel(1.0, 0.0, 0.0, 1.0, np.ones((world, world)), np.zeros((world, world)), node)
    num_layers, num_slots = phy2log.shape
    if num_layers != trace.num_layers:
        raise ReplayError(f"placement has {num_layers} layers but the trace has {trace.num_layers}")
    spr = num_slots // world
    hidden = max(1, trace.hidden_size // settings.shape_scale)
    inter = max(1, trace.moe_intermediate_size // settings.shape_scale)
    experts = [expert_fn or random_experts(spr, hidden, inter, settings.seed + 1000 * layer + rank)
               for layer in range(num_layers)]
    location = expert_location(phy2log, world, trace.num_experts)
    log2phy, counts = torch.from_numpy(location.log2phy), torch.from_numpy(location.count)
    ids = torch.from_numpy(trace.topk_ids.astype(np.int64))  # [T, L, k]
    weights = torch.ones(ids.shape) if trace.topk_weights is None else \
        torch.from_numpy(trace.topk_weights.astype(np.float32))
    primary = torch.from_numpy(primary_column(trace.topk_ids, trace.topk_weights))
    routing = location.layers()
    relay = cluster.ranks_per_node if settings.dataflow == "hierarchical" else None
    gen = torch.Generator().manual_seed(settings.seed)
    rows: list[dict] = []
    tokens, wall = 0, 0.0
    steps = list(step_ranges(trace.num_tokens, settings))
    for step, lo, hi in tqdm(steps, desc=f"replay {settings.dataflow}", unit="step", disable=rank != 0):
        batch = hi - lo
        mine = torch.arange(lo + rank, hi, world)  # trace ids of the tokens with home rank `rank`
        x = torch.randn(len(mine), hidden, generator=gen)
        torch.distributed.barrier()
        if on_step is not None:
            on_step()
        t0 = time.perf_counter()
        step_rows = []
        if settings.dispatch != "dynamic":  # every rank chooses for the whole step alike
            step_slots = torch.from_numpy(choose_step_slots(ids[lo:hi].numpy(), primary[lo:hi].numpy(), routing,
                                                            cost, settings.dataflow, settings.dispatch))
        for layer in range(num_layers):
            if settings.dispatch == "dynamic":
                slots = choose_slots(ids[mine, layer], mine - lo, log2phy[layer], counts[layer])
            else:
                slots = step_slots[mine - lo, layer]
            if settings.dataflow != "expert_to_expert" or layer == num_layers - 1:
                dest = (mine - lo) % world
            else:
                dest = slots[torch.arange(len(mine)), primary[mine, layer]] // spr

            def record(tok: torch.Tensor, slot: torch.Tensor, layer: int = layer) -> None:
                if delivered is not None:
                    np.add.at(delivered, (tok.numpy(), layer, phy2log[layer, rank * spr + slot.numpy()]), 1)

            part, part_tok, times = ep_layer(x, mine, slots, weights[mine, layer], spr, dest,
                                             experts[layer], world, rank, record, ranks_per_node=relay)
            mine, inverse = torch.unique(part_tok, return_inverse=True)
            out = torch.zeros(len(mine), hidden).index_add_(0, inverse, part)
            x = F.rms_norm(out, (hidden,))
            step_rows.append(layer_row(step, layer, rank, cluster, times))
        if step >= settings.warmup_steps:
            wall += time.perf_counter() - t0
            tokens += batch
            rows.extend(step_rows)
    return rows, tokens, wall
