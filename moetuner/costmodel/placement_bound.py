"""A lower bound on the step time of ONE placement held fixed across the scored steps (docs/formulation.md
section 5.4).

`bounds.lower_bound` lets the placement change from step to step; here one placement with S slots per GPU
serves every scored step, under any dispatch. Layers are independent for the dataflows bounded here (a
token starts every layer on its home GPU), so the bound is the sum over layers of the optimum of one LP
per layer (a relaxation of the placement problem, solved with HiGHS through PuLP):

- z[e, g] in [0, 1]: expert e is on GPU g; sum_e z[e, g] <= S, sum_g z[e, g] >= 1 for every routed expert;
  y[e, N] <= min(1, sum_{g in N} z[e, g]): e is on node N (more than one node);
- compute: the per-step compute bound (`bounds.compute_lower_bound`). With fractional slots every expert
  can sit on every GPU, so the LP's own compute epigraph (shares q[s, e, g] <= z[e, g] of each expert's
  pairs, C[s] >= sum_e min_x(f(x) / x) m[s, e] q[s, e, g] per GPU) spreads the work perfectly and is
  never above the per-step bound's mean term (measured equal on the default study, at 100x the solve
  time), so it is left out; the gain of holding the placement fixed is in the communication;
- communication A[s] (scatter + combine) per home GPU h, two lower bounds on the copies h's tokens send (the
  combine sends them back): (1) a token leaves h unless h holds all its experts, an indicator
  >= max_{e in t} (1 - z[e, h]) >= mean_{e in t} (1 - z[e, h]), and surely when it has more distinct
  experts than S (`leave_weights`; the mean instead of the max needs no per-token variables); (2) its
  experts outside h are served by GPUs holding at most S of them each, so it reaches at least
  sum_{e in t} (1 - z[e, h]) / min(S, |t|) other GPUs (`destination_weights`). The inter-node copies
  likewise with y[e, N(h)]: (1) with S n, (2) with S (one copy per GPU; per node, S n, for
  `hierarchical`). Serial links: A[s] >= (scatter + combine bytes) x (copies / h's fastest bandwidth +
  inter-node copies x (1 / fastest inter-node bandwidth - 1 / fastest)) for each pair of the bounds, +
  2 x the smallest latency x (1) / h's tokens (a phase with any copy pays a latency), or 2 x the latency
  itself where a copy is certain: h's tokens in the step need more distinct experts than S (a GPU holds),
  and the smallest inter-node latency where they need more than S n (a node holds); concurrent links:
  copies at the two ports' summed bandwidth, and inter-node copies at the inter-node one, separately;
  `low_latency` sends one copy per pair (pairs instead of tokens). `hierarchical` on several nodes: the
  inter-node phase alone (copies to the relays); on one node it is `dispatch_combine`. And A[s] >= the
  per-step communication bound (`bounds.comm_lower_bound`).
- objective: mean over steps of the compute bound + A[s].

`expert_to_expert` is refused: its tokens do not start a layer at home, so layers are not independent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp

from moetuner.costmodel.bounds import comm_lower_bound, compute_lower_bound
from moetuner.costmodel.cost import CostModel, SimulationError

BOUND_DATAFLOWS = ("dispatch_combine", "hierarchical", "low_latency")
US = 1e6  # the LP is solved in microseconds (better scaled than seconds)


@dataclass(frozen=True)
class FixedPlacementBound:
    """The bound and what it took."""

    step_s: float  # mean over the scored steps of the step time no fixed placement beats
    per_layer_s: np.ndarray  # [L] each layer's share (mean over steps)
    per_step_s: float  # bounds.lower_bound on the same steps (the placement may change per step)
    seconds: float  # wall time of building and solving the LPs


def check_bound_dataflow(dataflow: str) -> None:
    """Raise SimulationError unless the bound takes `dataflow` (BOUND_DATAFLOWS)."""
    if dataflow not in BOUND_DATAFLOWS:
        raise SimulationError(f"the fixed-placement bound takes dataflow one of {list(BOUND_DATAFLOWS)}, not "
                              f"{dataflow!r} (expert_to_expert couples the layers); set bound=false or change "
                              f"the dataflow (bounds.lower_bound covers every dataflow)")


def check_bound_inputs(ids: np.ndarray, cost: CostModel, slots_per_gpu: int, step_tokens: int,
                       dataflow: str) -> None:
    """Raise SimulationError naming the first input the bound cannot take. ids [T, L, k]"""
    check_bound_dataflow(dataflow)
    if not 1 <= step_tokens <= ids.shape[0]:
        raise SimulationError(f"step_tokens={step_tokens} but the trace has {ids.shape[0]} tokens; "
                              f"choose 1 <= step_tokens <= {ids.shape[0]}")
    routed = max(len(np.unique(ids[:, layer])) for layer in range(ids.shape[1]))
    if routed > cost.num_gpus * slots_per_gpu:
        raise SimulationError(f"{routed} experts are routed in a layer but {cost.num_gpus} GPUs x {slots_per_gpu} "
                              f"slots hold fewer; raise slots_per_gpu")


def link_costs(cost: CostModel, gpu: int) -> tuple[float, float, float, float]:
    """(seconds per byte at GPU `gpu`'s fastest link, at its fastest inter-node link (inf bandwidth: 0),
    the smallest latency to another GPU, the smallest inter-node latency), both directions counted."""
    others = np.arange(cost.num_gpus) != gpu
    bw = np.maximum(cost.bandwidth[gpu], cost.bandwidth[:, gpu])
    lat = np.minimum(cost.latency[gpu], cost.latency[:, gpu])
    cross = cost.node != cost.node[gpu]
    inter = 1.0 / bw[cross].max() if cross.any() else 0.0
    if cost.link_model == "concurrent" and cross.any() and (others & ~cross).any():
        fastest = 1.0 / (bw[others & ~cross].max() + bw[cross].max())  # both ports at once
    else:
        fastest = 1.0 / bw[others].max() if others.any() else 0.0
    inter_lat = float(lat[cross].min()) if cross.any() else 0.0
    return fastest, inter, float(lat[others].min()) if others.any() else 0.0, inter_lat


def leave_weights(tokens: np.ndarray, capacity: int, num_experts: int) -> tuple[float, np.ndarray]:
    """(forced, weight): a token with more than `capacity` distinct experts surely leaves a GPU (node) that
    holds at most `capacity` experts (forced counts them); any other token t leaves with indicator
    >= max_{e in t} (1 - z[e]) >= mean_{e in t} (1 - z[e]), so the tokens leaving are at least
    forced + sum_e weight[e] (1 - z[e]), weight[e] = sum over such tokens t holding e of 1 / |t|.
    tokens [B, k] -> (float, [E])"""
    ordered = np.sort(tokens, axis=1)  # [B, k]
    first = np.ones(ordered.shape, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # first occurrence of each distinct expert
    distinct = first.sum(1)  # [B]
    free = distinct <= capacity
    share = np.where(first & free[:, None], 1.0 / distinct[:, None], 0.0)  # [B, k]
    weight = np.bincount(ordered.ravel(), weights=share.ravel(), minlength=num_experts)
    return float((~free).sum()), weight


def destination_weights(tokens: np.ndarray, capacity: int, num_experts: int) -> np.ndarray:
    """weight[e] = sum over the tokens t holding e of 1 / min(capacity, |t|): a token whose experts outside a
    GPU (node) are served by GPUs (nodes) holding at most `capacity` of them each reaches at least
    (its experts outside) / min(capacity, |t|) of them, so its copies are at least sum_e weight[e] (1 - z[e]).
    tokens [B, k] -> [E]"""
    ordered = np.sort(tokens, axis=1)  # [B, k]
    first = np.ones(ordered.shape, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    share = np.where(first, 1.0 / np.minimum(first.sum(1), capacity)[:, None], 0.0)  # [B, k]
    return np.bincount(ordered.ravel(), weights=share.ravel(), minlength=num_experts)


def leaving(weight: np.ndarray, forced: float, present: dict) -> pulp.LpAffineExpression:
    """forced + sum_e weight[e] (1 - present[e]) as one affine expression (built directly: PuLP's operators
    are slow at this size). weight [E]; present: expert -> LP variable"""
    experts = np.flatnonzero(weight)
    return pulp.LpAffineExpression([(present[e], -float(weight[e])) for e in experts],
                                   constant=forced + float(weight[experts].sum()))


def per_step_bounds(windows: np.ndarray, cost: CostModel, slots_per_gpu: int, dataflow: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(compute, communication) seconds of bounds.py for every step of one layer. windows [S, B, k] -> ([S], [S])"""
    return (np.array([compute_lower_bound(ids, cost, slots_per_gpu) for ids in windows]),
            np.array([comm_lower_bound(ids, cost, slots_per_gpu, dataflow) for ids in windows]))


def layer_lp(windows: np.ndarray, cost: CostModel, slots_per_gpu: int, dataflow: str, routed: np.ndarray,
             per_step: tuple[np.ndarray, np.ndarray]) -> pulp.LpProblem:
    """The LP of one layer (module docstring), in microseconds. windows [S, B, k] expert ids of each step
    (token j of a step on GPU j % G), routed [E] bool the experts that must hold a slot, per_step the
    per-step (compute [S], communication [S]) bounds (per_step_bounds)."""
    num_steps = windows.shape[0]
    num_gpus, num_experts, per_node = cost.num_gpus, len(routed), cost.gpus_per_node
    multi_node = bool((cost.node != cost.node[0]).any())
    hier_multi = dataflow == "hierarchical" and multi_node
    prob = pulp.LpProblem("fixed_placement_bound", pulp.LpMinimize)
    experts, gpus = np.flatnonzero(routed), range(num_gpus)
    z = {(e, g): pulp.LpVariable(f"z_{e}_{g}", 0, 1) for e in experts for g in gpus}
    for g in gpus:
        prob += pulp.lpSum(z[e, g] for e in experts) <= slots_per_gpu
    for e in experts:
        prob += pulp.lpSum(z[e, g] for g in gpus) >= 1
    y = {}
    if multi_node:
        for e in experts:
            for n in sorted(set(cost.node.tolist())):
                y[e, n] = pulp.LpVariable(f"y_{e}_{n}", 0, 1)
                prob += y[e, n] <= pulp.lpSum(z[e, g] for g in np.flatnonzero(cost.node == n))
    out_bytes, back_bytes = cost.phase_bytes
    both = (out_bytes + back_bytes) * US
    links = [link_costs(cost, g) for g in gpus]
    objective = []
    for s in range(num_steps):
        ids = windows[s]
        compute_s = float(per_step[0][s]) * US  # what fractional slots leave of compute
        comm = pulp.LpVariable(f"A_{s}", float(per_step[1][s]) * US)
        objective += [compute_s, comm]
        for h in gpus:
            fastest, inter, lat, inter_lat = links[h]
            mine = ids[h::num_gpus]  # [B_h, k] tokens at home on h
            if not len(mine):
                continue
            on_gpu, on_node = {e: z[e, h] for e in experts}, {e: y.get((e, cost.node[h])) for e in experts}
            if dataflow == "low_latency":  # one copy per pair
                pairs = np.bincount(mine.ravel(), minlength=num_experts).astype(float)  # [E]
                copies = [leaving(pairs, 0.0, on_gpu)]
                crossing = [leaving(pairs, 0.0, on_node)] if multi_node else [0.0]
                total = float(pairs.sum())
            else:  # indicators (<= 1 per token, also priced for latency), then destinations (<= S experts each)
                copies = [leaving(*leave_weights(mine, slots_per_gpu, num_experts)[::-1], on_gpu),
                          leaving(destination_weights(mine, slots_per_gpu, num_experts), 0.0, on_gpu)]
                node_capacity = slots_per_gpu * per_node if dataflow == "hierarchical" else slots_per_gpu
                crossing = [leaving(*leave_weights(mine, slots_per_gpu * per_node, num_experts)[::-1], on_node),
                            leaving(destination_weights(mine, node_capacity, num_experts), 0.0, on_node)] \
                    if multi_node else [0.0]
                total = float(len(mine))
            needs = len(np.unique(mine))  # distinct experts h's tokens need in this step
            node_certain = multi_node and needs > slots_per_gpu * per_node
            inter_latency = 2 * inter_lat * US if node_certain else 2 * inter_lat * US / total * crossing[0]
            latency = 2 * max(lat, inter_lat if node_certain else 0.0) * US if needs > slots_per_gpu \
                else 2 * lat * US / total * copies[0]
            for cross in crossing:
                if hier_multi:
                    prob += comm >= both * inter * cross + inter_latency
                elif cost.link_model == "concurrent":
                    if multi_node:
                        prob += comm >= both * inter * cross + inter_latency
                else:
                    for copy in copies:
                        prob += comm >= both * (fastest * copy + max(inter - fastest, 0.0) * cross) + latency
            if cost.link_model == "concurrent" and not hier_multi:
                for copy in copies:
                    prob += comm >= both * fastest * copy + latency
    prob += pulp.lpSum(objective) * (1.0 / num_steps)
    return prob


def solve_lp(prob: pulp.LpProblem) -> float:
    """Optimal value of a minimisation LP with HiGHS (the thin PuLP adapter); SimulationError unless optimal."""
    solver = pulp.HiGHS(msg=False)
    if not solver.available():
        raise SimulationError("the fixed-placement bound needs HiGHS (pip install highspy)")
    prob.solve(solver)
    if prob.status != pulp.LpStatusOptimal:
        raise SimulationError(f"the bound's LP ended {pulp.LpStatus[prob.status]}; this is a bug, report it")
    return float(pulp.value(prob.objective))


def step_windows(ids: np.ndarray, step_tokens: int) -> np.ndarray:
    """Full steps of consecutive tokens (a trailing partial step is left out). ids [T, L, k] -> [S, B, L, k]"""
    num_steps = ids.shape[0] // step_tokens
    return ids[:num_steps * step_tokens].reshape(num_steps, step_tokens, *ids.shape[1:])


def fixed_placement_bound(ids: np.ndarray, cost: CostModel, slots_per_gpu: int, step_tokens: int,
                          dataflow: str = "dispatch_combine") -> FixedPlacementBound:
    """Mean step time over the full steps of `step_tokens` tokens that no placement with `slots_per_gpu` slots
    per GPU, the same in every step, beats under any dispatch (module docstring). ids [T, L, k]

    Every expert routed anywhere in `ids` must hold a slot (as check_placement asks of a placement scored on
    it). Also reports the per-step bound on the same steps (bounds.lower_bound, summed from the same per-step
    parts), which it never falls below.
    """
    check_bound_inputs(ids, cost, slots_per_gpu, step_tokens, dataflow)
    start = time.perf_counter()
    ids = ids.astype(np.int64)
    windows = step_windows(ids, step_tokens)
    num_experts = int(ids.max()) + 1
    per_layer, per_step = [], np.zeros(len(windows))
    for layer in range(ids.shape[1]):
        routed = np.bincount(ids[:, layer].ravel(), minlength=num_experts) > 0
        steps = per_step_bounds(windows[:, :, layer], cost, slots_per_gpu, dataflow)
        per_step += steps[0] + steps[1]
        lp = layer_lp(windows[:, :, layer], cost, slots_per_gpu, dataflow, routed, steps)
        per_layer.append(solve_lp(lp) / US)
    return FixedPlacementBound(step_s=float(sum(per_layer)), per_layer_s=np.array(per_layer),
                               per_step_s=float(per_step.mean()),
                               seconds=time.perf_counter() - start)
