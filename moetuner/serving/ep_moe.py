"""Expert-parallel MoE exchange: route (token, expert) pairs to the ranks that hold the experts.

One primitive, `exchange`, moves rows to destination ranks with `all_to_all_single` and uneven
splits (the counts are exchanged first; emulated runs use `posted_all_to_all`, which posts every
receive before any payload leaves). Every dataflow is built from it:
  dispatch: one row per distinct (token, destination rank), carrying the token's local slot ids and
            gate weights for that rank (DeepEP-style dedup); rows for the own rank cost no bytes;
  combine:  each expert rank sums its weighted expert outputs per received row and sends that
            partial sum to the rank the token lives on next (its home, or its top-1 expert's rank).
  hierarchical (DeepEP inter-node, `ranks_per_node`): the dispatch runs in two phases: one row per
            (token, other node) goes to the relay there, the rank with the sender's local rank
            (inter-node exchange); then the relays and the senders (for their own node) send one row
            per (token, destination rank) inside the node (intra-node exchange). The combine reverses
            it: partial sums go back to the intra-node sender, relays add up theirs per token and send
            one row per (token, node) home.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol
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
    bytes_sent: np.ndarray  # [W] bytes of the rows (values, meta, padding) sent to each rank (0 to itself)
    bytes_received: np.ndarray  # [W] bytes of the rows received from each rank (0 from itself)


class ExchangeHook(Protocol):
    """Emulation hooks (serving/emulation.py) that every `exchange` of this process calls; rows are
    zero-padded to `row_bytes` (so dispatch and combine rows weigh the same on shaped links)."""

    row_bytes: int
    clock: float  # perf_counter seconds: when this rank is ready for the next exchange (modelled)
    send_order: list[int]  # the peers, in the order this rank's messages leave

    def before_payload(self, send_counts: torch.Tensor, recv_counts: torch.Tensor, start: float) -> None:
        """After the counts [W] are known, before the payload moves; start: the latest clock of all
        ranks (the exchange starts when the last rank is ready)."""

    def after_payload(self) -> None:
        """When this rank has received its rows."""


_exchange_hooks: list[ExchangeHook] = []


def set_exchange_hook(hook: ExchangeHook | None) -> None:
    """Install (or with None remove) the hook every `exchange` of this process calls (emulated latency)."""
    _exchange_hooks[:] = [] if hook is None else [hook]


def exchange(x: torch.Tensor, meta: torch.Tensor, dest: torch.Tensor, world: int, rank: int) -> Exchanged:
    """Send row i of x [N, H] and meta [N, m] to rank dest[i]; return the rows this rank receives.

    Two all-to-alls: the counts, then x and meta together as one byte row each ([N, H*s + m*8])."""
    assert x.shape[0] == meta.shape[0] == dest.shape[0], "x, meta and dest need one row each"
    order = torch.argsort(dest, stable=True)
    x, meta, dest = x[order].contiguous(), meta[order].contiguous(), dest[order]
    send_counts = torch.bincount(dest, minlength=world)
    hook = _exchange_hooks[0] if _exchange_hooks else None  # set_exchange_hook installs at most one
    if hook is None:
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
    else:  # each count travels with the sender's clock (ns; one host, one monotonic clock)
        got = torch.empty((world, 2), dtype=torch.long)
        dist.all_to_all_single(got, torch.stack([send_counts, torch.full_like(send_counts, int(hook.clock * 1e9))], 1))
        recv_counts, start = got[:, 0].contiguous(), float(got[:, 1].max()) / 1e9
    send, recv = send_counts.tolist(), recv_counts.tolist()
    x_bytes = x.shape[1] * x.element_size()
    meta_bytes = meta.shape[1] * meta.element_size()
    assert hook is None or x_bytes + meta_bytes <= hook.row_bytes, \
        f"{x_bytes + meta_bytes}-byte rows exceed the emulated row size (emulation.wire_row_bytes)"
    pad = 0 if hook is None else hook.row_bytes - x_bytes - meta_bytes
    packed = torch.cat([x.view(torch.uint8).reshape(len(x), x_bytes),
                        meta.view(torch.uint8).reshape(len(meta), meta_bytes),
                        torch.zeros((len(x), pad), dtype=torch.uint8)], 1)
    out = packed.new_empty((sum(recv), packed.shape[1]))
    if hook is None:
        dist.all_to_all_single(out, packed, recv, send)
    else:
        posted_all_to_all(out, packed, recv, send, rank, hook.send_order,
                          lambda: hook.before_payload(send_counts, recv_counts, start))
        hook.after_payload()
    out_x = out[:, :x_bytes].contiguous().view(x.dtype)
    out_meta = out[:, x_bytes:x_bytes + meta_bytes].contiguous().view(meta.dtype)
    src = torch.repeat_interleave(torch.arange(world), recv_counts)
    sent, received = (counts.numpy() * packed.shape[1] for counts in (send_counts, recv_counts))
    sent[rank] = received[rank] = 0
    return Exchanged(out_x, out_meta, src, sent, received)


def posted_all_to_all(out: torch.Tensor, inp: torch.Tensor, recv: list[int], send: list[int], rank: int,
                      send_order: list[int], before_payload: Callable[[], object]) -> None:
    """all_to_all_single(out, inp, recv, send) with every receive posted, and known to its sender,
    before any payload leaves (emulated links).

    gloo sends a message only once the receiver's ready notice has arrived, and that notice travels
    behind whatever payload the receiver already queued to the sender on their shared socket: on
    rate-shaped links a flow would then wait for the reverse flow. Here each rank posts its receives
    (their notices go out on idle sockets), a tiny all-to-all follows them on every socket (so once it
    is done, every peer's notices have arrived), `before_payload()` runs, then all sends start at once.
    out [sum(recv), B], inp [sum(send), B] uint8 rows."""
    world = len(recv)
    outs, ins = out.split(recv), inp.split(send)
    works = [dist.irecv(outs[peer], src=peer) for peer in range(world) if peer != rank and recv[peer] > 0]
    dist.all_to_all_single(torch.empty(world, dtype=torch.uint8), torch.zeros(world, dtype=torch.uint8))
    before_payload()
    works += [dist.isend(ins[peer], dst=peer) for peer in send_order if send[peer] > 0]
    outs[rank].copy_(ins[rank])
    for work in works:
        work.wait()


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

    scatter_s: float = 0.0
    compute_s: float = 0.0
    combine_s: float = 0.0
    rows_in: int = 0  # activation rows received for expert compute
    pairs: int = 0  # (token, expert) pairs computed
    active_slots: int = 0  # local slots that received at least one pair
    port_bytes: np.ndarray = field(default_factory=lambda: np.zeros((2, 2, 0)))  # [phase, sent|received, W]

    @property
    def bytes_sent(self) -> np.ndarray:
        """Row bytes sent to each rank over both phases. [W]"""
        return self.port_bytes[:, 0].sum(0)


ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]
"""expert_fn(local_slot, x [n, H]) -> [n, H]"""


def ep_layer(x: torch.Tensor, token_ids: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
             slots_per_rank: int, combine_dest: torch.Tensor, expert_fn: ExpertFn, world: int,
             rank: int, on_pairs: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
             ranks_per_node: int | None = None) -> tuple[torch.Tensor, torch.Tensor, LayerTimes]:
    """One expert-parallel MoE layer over the N tokens this rank holds.

    x [N, H]; token_ids int64 [N] (any ids that name a token across ranks); slots int64 [N, k]
    global physical slots; weights [N, k] gate weights; combine_dest int64 [N] the rank each
    token's output goes to. Returns (partial outputs [M', H], their token ids [M'], times): rows
    for one token may arrive from several expert ranks; the caller sums them (index_add).
    on_pairs(token_ids [n], local_slots [n]) is called with every pair computed (for checks).
    ranks_per_node: relay inter-node traffic (hierarchical; then combine_dest must be this rank).
    """
    times = LayerTimes()
    n, k = slots.shape
    t0 = time.perf_counter()
    hidden = x.shape[1]
    dest_of_pair = slots // slots_per_rank  # [N, k]
    payload = torch.cat([x, weights.to(x.dtype)], 1)  # [N, H + k]
    ports = np.zeros((2, 2, world))  # [scatter|combine, sent|received, peer] row bytes on the wire
    if ranks_per_node is None:
        src_x, src_meta = payload, torch.stack([token_ids, combine_dest], 1)  # (token id, combine target)
        src_slots, src_of_pair = slots, dest_of_pair
    else:
        # phase 1: one row per (token, other node) to the relay of this rank's local rank there
        node = dest_of_pair // ranks_per_node
        here = rank // ranks_per_node
        relay = torch.where(node == here, rank, node * ranks_per_node + rank % ranks_per_node)  # [N, k]
        key = torch.arange(n).unsqueeze(1) * world + relay
        rows, pair_row = torch.unique(key, return_inverse=True)
        row_token, row_dest = rows // world, rows % world
        row_slots = torch.full((len(rows), k), -1, dtype=torch.long)
        row_slots[pair_row, torch.arange(k).expand(n, k)] = slots
        meta = torch.cat([token_ids[row_token].unsqueeze(1), row_slots], 1)
        hop = exchange(payload[row_token], meta, row_dest, world, rank)  # own-node rows stay here
        ports[0] += (hop.bytes_sent, hop.bytes_received)
        # the rows here now: (token id, the sender to combine back to), slots on this node
        src_x, src_slots = hop.x, hop.meta[:, 1:]
        src_meta = torch.stack([hop.meta[:, 0], hop.src], 1)
        src_of_pair = torch.where(src_slots >= 0, src_slots // slots_per_rank, -1)
    # (intra-node when hierarchical) dispatch: one row per distinct (row, destination rank)
    m = src_x.shape[0]
    key = torch.arange(m).unsqueeze(1) * world + src_of_pair
    valid = src_slots >= 0
    rows, pair_row = torch.unique(key[valid], return_inverse=True)
    row_src, row_dest = rows // world, rows % world
    local = torch.full((len(rows), k), -1, dtype=torch.long)
    wcol = torch.zeros((len(rows), k), dtype=x.dtype)
    cols = torch.arange(k).expand(m, k)[valid]
    local[pair_row, cols] = src_slots[valid] % slots_per_rank
    wcol[pair_row, cols] = src_x[:, hidden:][valid.nonzero(as_tuple=True)]
    meta = torch.cat([src_meta[row_src], row_src.unsqueeze(1), local], 1)  # token, target, sender's row, slots
    got = exchange(torch.cat([src_x[row_src, :hidden], wcol], 1), meta, row_dest, world, rank)
    ports[0] += (got.bytes_sent, got.bytes_received)
    times.scatter_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    acts, gate_w = got.x[:, :hidden], got.x[:, hidden:]
    out = torch.zeros_like(acts)
    local_slots = got.meta[:, 3:]
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
    if ranks_per_node is None:
        back = exchange(out, got.meta[:, :1], got.meta[:, 1], world, rank)
        result = back.x, back.meta[:, 0]
    else:
        # intra-node: partial sums back to the sender of each row (a relay or the token's rank) ...
        back = exchange(out, got.meta[:, 2:3], got.src, world, rank)
        ports[1] += (back.bytes_sent, back.bytes_received)
        # ... which adds them up per row it sent and sends one row per (token, node) home
        rows, inverse = torch.unique(back.meta[:, 0], return_inverse=True)
        summed = torch.zeros(len(rows), hidden, dtype=out.dtype).index_add_(0, inverse, back.x)
        back = exchange(summed, src_meta[rows, :1], src_meta[rows, 1], world, rank)
        result = back.x, back.meta[:, 0]
    times.combine_s = time.perf_counter() - t0
    ports[1] += (back.bytes_sent, back.bytes_received)
    times.port_bytes = ports
    return result[0], result[1], times
