"""The simulator's step times for a chunk of steps at once: the same cost arithmetic, batched over steps.

A dispatch that picks a replica without solving anything (`dynamic`, `static`) chooses every pair's slot
by a gather, so a chunk of C steps is one array computation per layer instead of C calls of
`moetuner.costmodel.simulator.layer_step`. The copy matrices are integer counts built by the simulator's
own functions (cost.copy_matrix, cost.pair_copy_matrix, cost.relay_copies), and the times by
cost.a2a_time, CostModel.gpu_compute and simulator.phases over the leading step axis, so every expert
model, link model, per-message cost, byte size and dataflow the simulator knows is covered, and the
times agree with `simulate` (tests/test_batched.py: every preset, 1e-9 relative per step).
`lp` and `lp_comm` solve a problem per batch; `check_batched` refuses them (score them with the
simulator, step by step: costmodel/score.py does).
"""

from __future__ import annotations

import numpy as np

from moetuner.costmodel.cost import (CostModel, SimulationError, a2a_time, copy_matrix, needed_gpus, pair_copy_matrix,
                                     phases, relay_copies)
from moetuner.costmodel.replicas import static_table
from moetuner.costmodel.settings import check_dataflow, check_dispatch
from moetuner.costmodel.simulator import SimResult
from moetuner.placement import ExpertLocation, LayerSlots

BATCHED_DISPATCHES = ("dynamic", "static")
"""Dispatches the batched path reproduces exactly (the others solve a problem per batch)."""


def batched_supported(dispatch: str) -> bool:
    """Whether `simulate_batched` reproduces the simulator under this dispatch."""
    return dispatch in BATCHED_DISPATCHES


def check_batched(dataflow: str, dispatch: str) -> None:
    """Raise SimulationError unless the batched path reproduces the simulator for this setting."""
    check_dataflow(dataflow, SimulationError)
    check_dispatch(dispatch, SimulationError)
    if not batched_supported(dispatch):
        raise SimulationError(f"dispatch={dispatch!r} solves a problem per batch, which the batched path does not "
                              f"reproduce (it covers {list(BATCHED_DISPATCHES)}); score it step by step with the "
                              f"simulator (costmodel.score.score(..., method='simulator'))")


def batch_slots(ids: np.ndarray, token: np.ndarray, src: np.ndarray, slots: LayerSlots, table: np.ndarray | None,
                dispatch: str) -> np.ndarray:
    """replicas.choose_slots for C batches: `dynamic` (token t takes replica t mod count) or `static`
    (table [G, E]: the fixed replica of the pair's source GPU). ids [C, B, k], token [B], src [C, B] -> [C, B, k]"""
    if dispatch == "dynamic" or (slots.count <= 1).all():
        rank = token[None, :, None] % np.maximum(slots.count[ids], 1)
        return slots.log2phy[ids, rank]
    assert table is not None, "static dispatch needs the layer's static table"
    return table[src[..., None], ids]


def simulate_batched(location: ExpertLocation, ids: np.ndarray, primary: np.ndarray | None, cost: CostModel,
                     dataflow: str = "dispatch_combine", dispatch: str = "dynamic") -> SimResult:
    """`simulate` of C whole steps of B tokens each (token j of a step starts on GPU j % G).

    ids [C, B, L, k] int; primary [C, B, L] column of each token's primary expert (read by
    expert_to_expert only; None otherwise) -> SimResult [C, L] (choose_s None: nothing is solved)."""
    check_batched(dataflow, dispatch)
    num_steps, num_tokens, num_layers, _ = ids.shape
    assert dataflow != "expert_to_expert" or primary is not None, "expert_to_expert needs the primary column"
    G, P = cost.num_gpus, len(location.gpu_of_slot)
    out_bytes, back_bytes = cost.phase_bytes
    cross = cost.node[:, None] != cost.node[None, :]
    token = np.arange(num_tokens)
    home = np.broadcast_to(token % G, (num_steps, num_tokens))
    fields: dict[str, list[np.ndarray]] = {name: [] for name in
                                           ("scatter_s", "combine_s", "compute_s", "tokens", "bytes_intra", "bytes_inter")}
    src = home
    for layer in range(num_layers):
        slots = location.layer(layer)
        table = static_table(slots, cost.node) if dispatch == "static" else None
        slot = batch_slots(ids[:, :, layer], token, src, slots, table, dispatch)  # [C, B, k]
        dest = slots.gpu_of_slot[slot]
        if dataflow == "expert_to_expert" and layer < num_layers - 1:
            target = np.take_along_axis(dest, primary[:, :, layer, None], -1)[..., 0]
        else:
            target = home
        if dataflow == "hierarchical":
            inter, intra = relay_copies(src, needed_gpus(dest, G), cost)
            swap = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731
            scatter = phases(a2a_time(inter, cost, out_bytes), a2a_time(intra, cost, out_bytes), cost)
            combine = phases(a2a_time(swap(intra), cost, back_bytes), a2a_time(swap(inter), cost, back_bytes), cost)
            out = back = inter + intra
        else:
            if dataflow == "low_latency":
                out, back = pair_copy_matrix(src, dest, G), pair_copy_matrix(target, dest, G)
            else:
                on = needed_gpus(dest, G)
                out, back = copy_matrix(src, on), copy_matrix(target, on)
            back = np.swapaxes(back, -1, -2)
            scatter, combine = a2a_time(out, cost, out_bytes), a2a_time(back, cost, back_bytes)
        per_slot = np.bincount((np.arange(num_steps)[:, None, None] * P + slot).ravel(),
                               minlength=num_steps * P).reshape(num_steps, P)
        moved = lambda where: (out * where).sum((-1, -2)) * out_bytes + (back * where).sum((-1, -2)) * back_bytes  # noqa: E731
        for name, value in (("scatter_s", scatter), ("combine_s", combine), ("compute_s", cost.gpu_compute(per_slot)),
                            ("tokens", per_slot.reshape(num_steps, G, -1).sum(-1).astype(float)),
                            ("bytes_intra", moved(~cross)), ("bytes_inter", moved(cross))):
            fields[name].append(value)
        src = target
    stacked = {name: np.stack(values, 1) for name, values in fields.items()}
    return SimResult(**stacked)
