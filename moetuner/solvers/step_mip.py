"""The exact placement MIP of one layer: each expert in one slot, the simulator's mean step time minimised
(docs/formulation.md section 5.5).

Without replicas the dispatch has no choice (every expert has one slot), so the simulator's time of a
layer-step under `dispatch_combine` is a function of the placement alone, and one MIP per layer (layers
are independent: tokens start every layer at home) states it exactly, solved with HiGHS through PuLP:

- x[e, g] binary: expert e on GPU g; sum_g x[e, g] = 1, sum_e x[e, g] <= S;
- u[s, t, d] >= x[e, d] for every expert e of token t (home h, d != h): t sends a copy to d (one per GPU:
  the simulator's per-GPU dedup); tokens of one home with the same expert set are merged (weights);
- v[s, h, d] >= u[s, t, d] for h's tokens: h sends anything to d (the latency and per-peer message terms);
- scatter P[s] >= every GPU's send and receive time (`cost.a2a_time`: bytes / bandwidth summed over peers,
  + the largest latency of a peer it exchanges with, + message_s per peer; `concurrent` links: the
  intra- and inter-node sums each, their maximum being what the simulator takes); the combine R[s] the
  same on the transposed copies (the combine returns every copy home);
- compute C[s] >= sum_e f(n[s, e]) x[e, g] + kernel_s * busy[s, g], busy[s, g] >= x[e, g] for the experts
  with tokens in step s (`cost.gpu_compute`);
- minimise (1 / #steps) sum_s (P[s] + C[s] + R[s]).

At integral x every u, v and busy sits at its indicator in an optimum, so the MIP's value is the simulated
time of its placement (tested against the simulator and brute force). Its budget is work: `max_nodes`
branch-and-bound nodes on one thread with a fixed seed (solvers/mip.py), so a solve stopped by the budget
gives the same placement on any machine; HiGHS's dual bound is then still a valid lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pulp

from moetuner.costmodel.cost import CostModel, SimulationError
from moetuner.solvers.mip import MAX_NODES, MipResult, solve_mip

US = 1e6  # the MIP is stated in microseconds (better scaled than seconds)


@dataclass(frozen=True)
class LayerMip:
    """One layer's solve: the row of slots [G * S] (GPU-major, -1 for an empty slot) and what HiGHS proved."""

    row: np.ndarray
    result: MipResult

    @property
    def time_s(self) -> float:
        """The mean step time of the row (the MIP's value), seconds."""
        assert self.result.objective is not None
        return self.result.objective / US

    @property
    def bound_s(self) -> float | None:
        """HiGHS's lower bound on every placement's mean step time, seconds (None if it gave none)."""
        return None if self.result.bound is None else self.result.bound / US


def check_mip_inputs(windows: np.ndarray, cost: CostModel, num_experts: int, slots_per_gpu: int,
                     dataflow: str) -> None:
    """Raise SimulationError naming the first input the exact MIP cannot take. windows [S, B, k]"""
    if dataflow != "dispatch_combine":
        raise SimulationError(f"the exact layer MIP states dataflow dispatch_combine only, not {dataflow!r}; "
                              f"use steptail (any dataflow) or set dataflow=dispatch_combine")
    if num_experts > cost.num_gpus * slots_per_gpu:
        raise SimulationError(f"{num_experts} experts but {cost.num_gpus} GPUs x {slots_per_gpu} slots hold fewer; "
                              f"raise slots_per_gpu")
    if windows.size and int(windows.max()) >= num_experts:
        raise SimulationError(f"expert id {int(windows.max())} in the steps but num_experts={num_experts}")


def merged_tokens(ids: np.ndarray, home: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Tokens of one step grouped by (home, distinct expert set): (home of each group [U], its experts,
    how many tokens it holds [U]). ids [B, k], home [B]"""
    member = np.zeros((len(ids), int(ids.max()) + 1), dtype=np.int64)  # [B, E] token holds expert
    member[np.arange(len(ids))[:, None], ids] = 1
    unique, counts = np.unique(np.concatenate([home[:, None], member], axis=1), axis=0, return_counts=True)
    return unique[:, 0], [np.flatnonzero(key[1:]) for key in unique], counts


def add_phase(prob: pulp.LpProblem, phase: pulp.LpVariable, copies: dict, sent: dict, bytes_per_copy: float,
              cost: CostModel) -> None:
    """phase >= every GPU's send and receive time (cost.a2a_time) of copies {(src, dst): affine count}, with
    sent {(src, dst): variable >= the indicator of any copy} for latencies and messages."""
    gpus = range(cost.num_gpus)
    cross = cost.node[:, None] != cost.node[None, :]
    seconds = bytes_per_copy * US / cost.bandwidth  # [G, G] per copy (0 on the diagonal)
    split = cost.link_model == "concurrent"
    for gpu in gpus:
        for outgoing in (True, False):
            pairs = [(gpu, d) if outgoing else (d, gpu) for d in gpus if d != gpu]
            lat = pulp.LpVariable(f"lat_{phase.name}_{gpu}_{int(outgoing)}", 0)
            for pair in pairs:
                prob += lat >= float(cost.latency[pair]) * US * sent[pair]
            fixed = lat + cost.message_s * US * pulp.lpSum(sent[p] for p in pairs)
            groups = [[p for p in pairs if not cross[p]], [p for p in pairs if cross[p]]] if split else [pairs]
            for group in groups:
                if group:
                    prob += phase >= pulp.lpSum(float(seconds[p]) * copies[p] for p in group) + fixed


def layer_mip(windows: np.ndarray, cost: CostModel, num_experts: int, slots_per_gpu: int,
              start: np.ndarray | None = None) -> tuple[pulp.LpProblem, dict]:
    """The MIP of one layer (module docstring) and its x variables {(e, g)}. windows [S, B, k] expert ids of
    each step (token j on GPU j % G); start [E] a GPU per expert to warm-start from, or None."""
    num_gpus = cost.num_gpus
    prob = pulp.LpProblem("layer_step_time", pulp.LpMinimize)
    experts, gpus = range(num_experts), range(num_gpus)
    x = {(e, g): pulp.LpVariable(f"x_{e}_{g}", cat="Binary") for e in experts for g in gpus}
    for e in experts:
        prob += pulp.lpSum(x[e, g] for g in gpus) == 1
    for g in gpus:
        prob += pulp.lpSum(x[e, g] for e in experts) <= slots_per_gpu
    if start is not None:
        for (e, g), var in x.items():
            var.setInitialValue(float(start[e] == g))
    out_bytes, back_bytes = cost.phase_bytes
    objective = []
    for s, ids in enumerate(windows):
        home, sets, weight = merged_tokens(ids, np.arange(len(ids)) % num_gpus)
        copies = {(h, d): [] for h in gpus for d in gpus if h != d}
        sent = {pair: pulp.LpVariable(f"v_{s}_{pair[0]}_{pair[1]}", 0, 1) for pair in copies}
        for t, (h, experts_t, w) in enumerate(zip(home, sets, weight)):
            for d in gpus:
                if d == h:
                    continue
                u = pulp.LpVariable(f"u_{s}_{t}_{d}", 0, 1)
                for e in experts_t:
                    prob += u >= x[int(e), d]
                prob += sent[h, d] >= u
                copies[h, d].append((u, float(w)))
        copies = {pair: pulp.LpAffineExpression(terms) for pair, terms in copies.items()}
        scatter, combine = pulp.LpVariable(f"P_{s}", 0), pulp.LpVariable(f"R_{s}", 0)
        add_phase(prob, scatter, copies, sent, out_bytes, cost)
        add_phase(prob, combine, {(d, h): c for (h, d), c in copies.items()},
                  {(d, h): v for (h, d), v in sent.items()}, back_bytes, cost)
        load = np.bincount(ids.ravel(), minlength=num_experts)  # [E] pairs of each expert
        busy_s = cost.expert_time(load.astype(float)) * US  # [E] its slot's time
        compute = pulp.LpVariable(f"C_{s}", 0)
        for g in gpus:
            busy = pulp.LpVariable(f"b_{s}_{g}", 0, 1)
            for e in np.flatnonzero(load):
                prob += busy >= x[int(e), g]
            prob += compute >= pulp.lpSum(float(busy_s[e]) * x[e, g] for e in np.flatnonzero(load)) \
                + cost.kernel_s * US * busy
        objective += [scatter, compute, combine]
    prob += pulp.lpSum(objective) * (1.0 / len(windows))
    return prob, x


def row_of(x: dict, num_gpus: int, num_experts: int, slots_per_gpu: int) -> np.ndarray:
    """The slot row [G * S] (GPU-major, experts in id order per GPU, -1 for empty slots) of a solved x."""
    row = np.full(num_gpus * slots_per_gpu, -1, dtype=np.int64)
    for g in range(num_gpus):
        mine = [e for e in range(num_experts) if (x[e, g].value() or 0.0) > 0.5]
        row[g * slots_per_gpu:g * slots_per_gpu + len(mine)] = mine
    return row


def solve_layer(windows: np.ndarray, cost: CostModel, num_experts: int, slots_per_gpu: int,
                start: np.ndarray | None = None, max_nodes: int = MAX_NODES, seed: int = 0,
                dataflow: str = "dispatch_combine", time_limit_s: float = 600.0) -> LayerMip:
    """Solve one layer's MIP within `max_nodes` nodes (module docstring). windows [S, B, k]; start [E] the GPU
    of each expert to warm-start from (None: none). SimulationError for inputs it cannot take or no solution."""
    check_mip_inputs(windows, cost, num_experts, slots_per_gpu, dataflow)
    prob, x = layer_mip(windows.astype(np.int64), cost, num_experts, slots_per_gpu, start)
    result = solve_mip(prob, time_limit_s=time_limit_s, gap_rel=1e-6, warm_start=start is not None,
                       max_nodes=max_nodes, seed=seed)
    if not result.has_solution:
        raise SimulationError(f"the layer MIP ended {result.status} within {max_nodes} nodes; give a warm start "
                              f"(start=) or raise max_nodes")
    return LayerMip(row_of(x, cost.num_gpus, num_experts, slots_per_gpu), result)
