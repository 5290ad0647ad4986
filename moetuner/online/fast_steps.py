"""Per-layer step times of many steps under one placement at once: the simulator's numbers, vectorised.

For the dataflows whose all-to-all goes home -> experts -> home (`dispatch_combine`, `hierarchical`) and
the dispatches that pick a replica without solving anything (`dynamic`, `static`), a layer's times
depend only on which slot serves each token-expert pair and on the token's home GPU (token j of a step
on GPU j mod G). Both are gathers, so a chunk of C steps is one array computation instead of C x L calls
of `moetuner.costmodel.simulator.layer_step`; the arithmetic is the simulator's, in the same order, so
the times agree with it (tests/test_online.py checks them against `simulate` to 1e-12 relative).
Other settings use the simulator step by step (`moetuner.online.steptimes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.costmodel.cost import CostModel
from moetuner.costmodel.replicas import layer_slots, static_table

FAST_DATAFLOWS = ("dispatch_combine", "hierarchical")
FAST_DISPATCHES = ("dynamic", "static")


def supported(dataflow: str, dispatch: str) -> bool:
    """Whether `layer_times` covers this setting exactly."""
    return dataflow in FAST_DATAFLOWS and dispatch in FAST_DISPATCHES


@dataclass(frozen=True)
class SlotTables:
    """Where each pair goes under a placement, by (layer, expert, token index in the step)."""

    slot: np.ndarray  # [L * E * B] layer * P + the slot serving the pair
    home_gpu: np.ndarray  # [L * E * B] (layer * B + token) * G + the GPU of that slot
    slots_per_gpu: int
    step_tokens: int


def slot_tables(phy2log: np.ndarray, num_experts: int, cost: CostModel, dispatch: str, step_tokens: int
                ) -> SlotTables:
    """Tables of a [L, P] placement for steps of `step_tokens` tokens (`dynamic`: token t takes replica
    t mod count; `static`: the fixed replica of the token's home GPU t mod G)."""
    G, (L, P), B = cost.num_gpus, phy2log.shape, step_tokens
    token = np.arange(B)
    slot = np.empty((L, num_experts, B), dtype=np.int64)
    for layer, slots in enumerate(layer_slots(phy2log, G, num_experts)):
        if dispatch == "dynamic":
            rank = token[None, :] % np.maximum(slots.count, 1)[:, None]  # [E, B]
            slot[layer] = slots.log2phy[np.arange(num_experts)[:, None], rank]
        else:
            slot[layer] = static_table(slots, cost.node)[token % G].T
    S = P // G
    layer = np.arange(L)[:, None, None]
    return SlotTables((layer * P + slot).astype(np.int32).ravel(),
                      ((layer * B + token) * G + slot // S).astype(np.int32).ravel(), S, B)


def a2a_times(copies: np.ndarray, cost: CostModel) -> np.ndarray:
    """`moetuner.costmodel.cost.a2a_time` of many phases at once. copies [..., G, G] (src, dst) -> [...]"""
    seconds = copies * cost.token_bytes / cost.bandwidth
    lat = np.where(copies > 0, cost.latency, 0.0)
    send = seconds.sum(-1) + lat.max(-1)
    receive = seconds.sum(-2) + lat.max(-2)
    return np.maximum(send, receive).max(-1)


def relay_map(cost: CostModel) -> np.ndarray:
    """Hierarchical forwarding: A[r, s, d] = 1 when a token from GPU s bound for GPU d on another node is
    forwarded by relay r (d's node, s's local rank) and r != d. -> int64 [G, G, G]"""
    G, n = cost.num_gpus, cost.gpus_per_node
    s, d = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    relay = cost.node[d] * n + s % n
    keep = (cost.node[s] != cost.node[d]) & (relay != d)
    out = np.zeros((G, G, G), dtype=np.int64)
    out[relay[keep], s[keep], d[keep]] = 1
    return out


def layer_times(ids: np.ndarray, tables: SlotTables, cost: CostModel, dataflow: str, dispatch: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(all-to-all = scatter + combine, compute tail) of every layer of C steps. ids [C, B, L, k] -> [C, L] each"""
    assert supported(dataflow, dispatch), f"no fast path for {dataflow}/{dispatch}"
    C, B, L, k = ids.shape
    assert B == tables.step_tokens, f"tables built for {tables.step_tokens}-token steps, got {B}"
    G, S = cost.num_gpus, tables.slots_per_gpu
    P, E = G * S, len(tables.slot) // (L * B)
    assert C * L * -(-B // G) * G * G < 2**31, "chunk too large for int32 indices"
    token = np.arange(B, dtype=np.int32)
    key = (ids.astype(np.int32) + (np.arange(L, dtype=np.int32) * E)[:, None]) * np.int32(B) + token[:, None, None]
    chunk = np.arange(C, dtype=np.int32)[:, None, None, None]
    per_slot = np.bincount((tables.slot[key] + chunk * np.int32(L * P)).ravel(), minlength=C * L * P)
    compute = cost.expert_time(per_slot.reshape(C, L, P)).reshape(C, L, G, S).sum(-1).max(-1)
    on = np.zeros(C * L * B * G, dtype=np.uint8)  # token (of chunk step, layer) needs GPU
    on[(tables.home_gpu[key] + chunk * np.int32(L * B * G)).ravel()] = 1
    padded = -(-B // G) * G  # tokens padded to whole rounds of home GPUs; pad tokens need nothing
    on = on.reshape(C, L, B, G)
    if padded > B:
        on = np.concatenate([on, np.zeros((C, L, padded - B, G), dtype=np.uint8)], axis=2)
    need = on.reshape(C, L, padded // G, G * G).sum(2, dtype=np.int64).reshape(C, L, G, G)  # [src, dst]
    need[:, :, np.arange(G), np.arange(G)] = 0  # no copy to the GPU the token is on
    if dataflow == "dispatch_combine":
        out = need
        return a2a_times(out, cost) + a2a_times(np.swapaxes(out, -1, -2), cost), compute
    n = cost.gpus_per_node
    nodes = G // n
    node_need = on.reshape(C, L, padded // G, G, nodes, n).max(-1).sum(2, dtype=np.int64)  # [C, L, src, node]
    src = np.arange(G)
    inter = np.zeros((C, L, G, G), dtype=np.int64)
    for b in range(nodes):
        away = cost.node[src] != b
        inter[:, :, src[away], b * n + src[away] % n] = node_need[:, :, src[away], b]
    same = cost.node[:, None] == cost.node[None, :]
    intra = need * same + np.einsum("rsd,clsd->clrd", relay_map(cost), need)
    scatter = a2a_times(inter, cost) + a2a_times(intra, cost)
    combine = a2a_times(np.swapaxes(intra, -1, -2), cost) + a2a_times(np.swapaxes(inter, -1, -2), cost)
    return scatter + combine, compute
