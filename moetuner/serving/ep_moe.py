"""Expert-parallel MoE exchange: route (token, expert) pairs to the ranks that hold the experts.

One primitive, `exchange`, moves rows to destination ranks with `all_to_all_single` and uneven
splits (the counts are exchanged first). Both dataflows are built from it:
  dispatch: one row per distinct (token, destination rank), carrying the token's local slot ids and
            gate weights for that rank (DeepEP-style dedup); rows for the own rank cost no bytes;
  combine:  each expert rank sums its weighted expert outputs per received row and sends that
            partial sum to the rank the token lives on next (its home, or its top-1 expert's rank).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Exchanged:
    """Rows received by one rank, with the meta columns and the source rank of each row."""

    x: torch.Tensor  # [M, H]
    meta: torch.Tensor  # int64 [M, m]
    src: torch.Tensor  # int64 [M]
    bytes_sent: np.ndarray  # [W] payload bytes this rank sent to each rank (0 to itself)


def exchange(x: torch.Tensor, meta: torch.Tensor, dest: torch.Tensor, world: int, rank: int) -> Exchanged:
    """Send row i of x [N, H] and meta [N, m] to rank dest[i]; return the rows this rank receives."""
    assert x.shape[0] == meta.shape[0] == dest.shape[0], "x, meta and dest need one row each"
    order = torch.argsort(dest, stable=True)
    x, meta, dest = x[order].contiguous(), meta[order].contiguous(), dest[order]
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    out_x = x.new_empty((sum(recv), x.shape[1]))
    out_meta = meta.new_empty((sum(recv), meta.shape[1]))
    dist.all_to_all_single(out_x, x, recv, send)
    dist.all_to_all_single(out_meta, meta, recv, send)
    src = torch.repeat_interleave(torch.arange(world), recv_counts)
    sent = send_counts.numpy() * x.shape[1] * x.element_size()
    sent[rank] = 0
    return Exchanged(out_x, out_meta, src, sent)


def choose_slots(topk_ids: torch.Tensor, token: torch.Tensor, log2phy: torch.Tensor,
                 replica_count: torch.Tensor) -> torch.Tensor:
    """Round-robin replica choice, as the simulator's: token t takes replica t % count[e].

    topk_ids [N, k] logical ids; token [N] index of each token in its step; log2phy [E, R] slots
    (-1 padded); replica_count [E] -> global slots [N, k].
    """
    ids = topk_ids.long()
    assert bool((replica_count[ids] > 0).all()), "a routed expert has no slot in the placement"
    return log2phy[ids, token.unsqueeze(1) % replica_count[ids]]


@dataclass
class LayerTimes:
    """What one rank measured in one MoE layer call."""

    dispatch_s: float = 0.0
    compute_s: float = 0.0
    combine_s: float = 0.0
    rows_in: int = 0  # activation rows received for expert compute
    pairs: int = 0  # (token, expert) pairs computed
    active_slots: int = 0  # local slots that received at least one pair
    bytes_sent: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [W]


ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]
"""expert_fn(local_slot, x [n, H]) -> [n, H]"""


def ep_layer(x: torch.Tensor, token_ids: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
             slots_per_rank: int, combine_dest: torch.Tensor, expert_fn: ExpertFn, world: int,
             rank: int, on_pairs: Callable[[torch.Tensor, torch.Tensor], None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, LayerTimes]:
    """One expert-parallel MoE layer over the N tokens this rank holds.

    x [N, H]; token_ids int64 [N] (any ids that name a token across ranks); slots int64 [N, k]
    global physical slots; weights [N, k] gate weights; combine_dest int64 [N] the rank each
    token's output goes to. Returns (partial outputs [M', H], their token ids [M'], times): rows
    for one token may arrive from several expert ranks; the caller sums them (index_add).
    on_pairs(token_ids [n], local_slots [n]) is called with every pair computed (for checks).
    """
    times = LayerTimes()
    n, k = slots.shape
    t0 = time.perf_counter()
    dest_of_pair = slots // slots_per_rank  # [N, k]
    # one row per distinct (token, destination rank); k columns of local slot ids (-1: not here)
    key = torch.arange(n).unsqueeze(1) * world + dest_of_pair
    rows, pair_row = torch.unique(key, return_inverse=True)
    row_token, row_dest = rows // world, rows % world
    local = torch.full((len(rows), k), -1, dtype=torch.long)
    wcol = torch.zeros((len(rows), k), dtype=x.dtype)
    cols = torch.arange(k).expand(n, k)
    local[pair_row, cols] = slots % slots_per_rank
    wcol[pair_row, cols] = weights.to(x.dtype)
    meta = torch.cat([token_ids[row_token].unsqueeze(1), combine_dest[row_token].unsqueeze(1), local], 1)
    got = exchange(torch.cat([x[row_token], wcol], 1), meta, row_dest, world, rank)
    times.dispatch_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    hidden = x.shape[1]
    acts, gate_w = got.x[:, :hidden], got.x[:, hidden:]
    out = torch.zeros_like(acts)
    local_slots = got.meta[:, 2:]
    for slot in torch.unique(local_slots[local_slots >= 0]).tolist():
        r, c = torch.nonzero(local_slots == slot, as_tuple=True)
        out.index_add_(0, r, expert_fn(slot, acts[r]) * gate_w[r, c].unsqueeze(1))
        times.pairs += len(r)
        times.active_slots += 1
        if on_pairs is not None:
            on_pairs(got.meta[r, 0], torch.full_like(r, slot))
    times.rows_in = int(acts.shape[0])
    times.compute_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    back = exchange(out, got.meta[:, :1], got.meta[:, 1], world, rank)
    times.combine_s = time.perf_counter() - t0
    times.bytes_sent = got.bytes_sent + back.bytes_sent
    return back.x, back.meta[:, 0], times
