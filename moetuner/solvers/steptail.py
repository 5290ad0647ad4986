"""steptail: local search over the simulator's per-step tail objective, warm-started from heuristics
(docs/formulation.md section 8).

Objective: the simulator's step time (sum over layers of scatter + compute tail + combine) averaged
over the profile's steps of `step_tokens` tokens, with the problem's `dispatch` (how the engine splits
tokens over replicas) and `dataflow`, so every step's tail counts, not the balance of the summed load.
With several profile domains each domain's own steps are scored and the per-domain step times are
combined by the problem's `robust` rule: weighted mean, or with robust=worst the largest ratio of a
domain's time to the contiguous layout's time on that domain (the objective is then that ratio). Steps:
1. warm start: run each solver in `warm_starts` (default: the registry's entries marked warm_start, in
   registry order; with several domains also on each domain alone), keep per layer the row with the
   lowest profile layer time (layers are independent unless the dataflow is expert-to-expert; then
   the best whole map);
2. per layer, an equal share of the work budget `max_moves`: random moves (drawn from `seed`), kept
   when the objective drops: swap two slots on different GPUs (one of them on the layer's busiest GPU
   half of the time), or, with replicas, point a spare replica slot at an expert drawn by load per copy;
3. return the better of the result and the best warm start on the full profile objective.
Warm starts and moves are scored with `search_dispatch` (default SEARCH_DISPATCH: the problem's
dispatch, but dynamic for lp_comm, whose per-step MILP is too slow for thousands of moves and which
measured better that way); `objective` is then recomputed with the problem's dispatch.
The budget is work, not time: the same inputs and options give the same placement on any machine and
at any load (the warm starts are deterministic too: partition's swaps run until none helps).
`time_limit_s` is only a safety cap on the search (the solve except the warm starts and the scorings):
when it stops the search before `max_moves`, the placement records `budget_bound_by: time` (else
`moves`) and the result then depends on the machine's speed.
Bound: the simulator's lower bound (compute and communication; `moetuner.costmodel.bounds.lower_bound`,
docs/formulation.md section 5) on the profile steps, combined over domains like the objective.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moetuner.solvers.completion import finish
from moetuner.placement import Placement, expert_location, logical_replica_count
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import get_solver, solver_names
from moetuner.costmodel.cost import CostModel, cost_model
from moetuner.costmodel.score import score, score_layer
from moetuner.costmodel.bounds import lower_bound as simulator_bound
from moetuner.trace import Trace, primary_column
from moetuner.costmodel.settings import Dispatch

MAX_MOVES = 3000
"""Default work budget: moves scored over all layers (conf/solver/steptail.yaml says how it was calibrated)."""
TIME_CAP_S = 600.0
"""Default safety cap on the search's wall time (`time_limit_s`)."""
SEARCH_DISPATCH = {"dynamic": "dynamic", "static": "static", "lp": "lp", "lp_comm": "dynamic"}
"""The dispatch each move (and warm start) is scored with, by the problem's dispatch."""


@dataclass(frozen=True)
class Steps:
    """One domain's profile cut into steps: ids [S, B, L, k], primary expert column [S, B, L]."""

    ids: np.ndarray
    primary: np.ndarray

    @property
    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """ids [S*B, L, k], primary [S*B, L]"""
        return self.ids.reshape(-1, *self.ids.shape[2:]), self.primary.reshape(-1, self.primary.shape[-1])

    def subset(self, count: int) -> "Steps":
        """At most `count` steps, evenly spaced."""
        if len(self.ids) <= count:
            return self
        pick = np.linspace(0, len(self.ids) - 1, count).round().astype(int)
        return Steps(self.ids[pick], self.primary[pick])


def trace_steps(trace: Trace, step_tokens: int) -> Steps:
    """A trace cut into steps of min(step_tokens, T) tokens (a trailing partial step is left out)."""
    tokens = min(step_tokens, trace.num_tokens)
    count = trace.num_tokens // tokens
    ids = trace.topk_ids[:count * tokens].astype(np.int64)
    primary = primary_column(trace.topk_ids, trace.topk_weights)[:count * tokens]
    return Steps(ids.reshape(count, tokens, *ids.shape[1:]), primary.reshape(count, tokens, -1))


def profile_steps(problem: PlacementProblem) -> list[Steps]:
    """Each profile domain cut into steps of the problem's step_tokens."""
    return [trace_steps(domain, problem.step_tokens) for domain in problem.domains]


def step_objective(phy2log: np.ndarray, problem: PlacementProblem, cost: CostModel, steps: list[Steps],
                   dispatch: Dispatch | None = None) -> np.ndarray:
    """Per domain, the mean over its steps of each layer's time (without lp / lp_comm's decision charge, which
    is the same for every placement with a replica in each layer). phy2log [L, P] -> [D, L]"""
    location = expert_location(phy2log, problem.num_gpus, problem.num_experts)
    out = []
    for domain in steps:
        ids, primary = domain.flat
        scored = score(location, ids, None, cost, domain.ids.shape[1], problem.dataflow, dispatch or problem.dispatch,
                       primary=primary)
        out.append(scored.free_layer_s.mean(0))
    return np.stack(out)


def lower_bound(problem: PlacementProblem, cost: CostModel, steps: list[Steps],
                reference: np.ndarray | None = None) -> float:
    """The simulator's lower bound (compute + communication, any placement with this slot count, any
    dispatch) on each domain's steps, combined over domains like the objective (reference [D]: see
    PlacementProblem.combine)."""
    return problem.combine(np.array([
        simulator_bound(domain.flat[0], cost, problem.slots_per_gpu, domain.ids.shape[1], problem.dataflow)
        for domain in steps]), reference)


class LayerSearch:
    """Mean time of one layer over each domain's profile steps, for a candidate row of slots."""

    def __init__(self, problem: PlacementProblem, cost: CostModel, layer: int, steps: list[Steps],
                 src: list[np.ndarray], dispatch: Dispatch) -> None:
        self.problem, self.cost, self.layer, self.dispatch = problem, cost, layer, dispatch
        self.steps, self.src = steps, src  # src: per domain [S, B] GPU each token starts the layer on
        last = layer == problem.num_layers - 1
        self.to_home = problem.dataflow != "expert_to_expert" or last

    def evaluate(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(per-domain mean layer time [D], per-GPU compute summed over all steps [G]) of a row [P]."""
        slots = expert_location(row[None], self.problem.num_gpus, self.problem.num_experts).layer(0)
        times, busy = [], np.zeros(self.problem.num_gpus)
        for domain, src in zip(self.steps, self.src):
            token = np.arange(domain.ids.shape[1])
            home = token % self.problem.num_gpus
            total = 0.0
            for s in range(len(domain.ids)):
                step = score_layer(domain.ids[s, :, self.layer], token, src[s], domain.primary[s, :, self.layer],
                                      home if self.to_home else None, slots, self.cost, self.dispatch,
                                      dataflow=self.problem.dataflow)
                total += step.time_s
                busy += step.compute_s
            times.append(total / len(domain.ids))
        return np.array(times), busy

    def next_src(self, row: np.ndarray) -> list[np.ndarray]:
        """Expert-to-expert: where each token's activation is after this layer (its primary expert's
        first replica). -> per domain [S, B]"""
        slots = expert_location(row[None], self.problem.num_gpus, self.problem.num_experts).layer(0)
        out = []
        for domain in self.steps:
            gpu = slots.gpu_of_slot[slots.log2phy[domain.ids[:, :, self.layer], 0]]  # [S, B, k]
            out.append(np.take_along_axis(gpu, domain.primary[:, :, self.layer][..., None], -1)[..., 0])
        return out


def propose(row: np.ndarray, busy: np.ndarray, load: np.ndarray, slots_per_gpu: int,
            rng: np.random.Generator) -> np.ndarray:
    """A neighbour of row [P]: a swap of two slots on different GPUs or a replica re-pointed. load [E]"""
    new = row.copy()
    counts = np.bincount(row[row >= 0], minlength=len(load))
    spare = np.flatnonzero((row >= 0) & (counts[np.maximum(row, 0)] > 1))
    if len(spare) and rng.random() < 0.3:
        slot = rng.choice(spare)
        share = load / np.maximum(counts, 1)
        new[slot] = rng.choice(len(load), p=share / share.sum()) if share.sum() > 0 else new[slot]
        return new
    gpu_a = int(np.argmax(busy)) if rng.random() < 0.5 else int(rng.integers(len(busy)))
    a = gpu_a * slots_per_gpu + int(rng.integers(slots_per_gpu))
    b = int(rng.integers(len(row)))
    if b // slots_per_gpu != gpu_a:
        new[a], new[b] = row[b], row[a]
    return new


def best_rows(candidates: list[np.ndarray], scores: list[np.ndarray], totals: list[float], separable: bool,
              problem: PlacementProblem) -> np.ndarray:
    """Per layer the row of the best candidate (separable, robust=mean: scores [D, L] combined per
    layer), else the best whole map (totals [C]). -> [L, P]"""
    if separable and problem.robust == "mean":
        per_layer = np.stack([np.asarray(problem.weights) @ s for s in scores])  # [C, L]
        pick = per_layer.argmin(0)
        return np.stack([candidates[c][layer] for layer, c in enumerate(pick)])
    return candidates[int(np.argmin(totals))].copy()


def warm_start_maps(problem: PlacementProblem, names: Sequence[str]) -> list[np.ndarray]:
    """phy2log [L, P] of each solver in `names` (default options: deterministic, no time limit) on the
    problem and, with several domains, also on each domain alone (one domain's placement may serve the
    others better than one from the mixed statistics)."""
    alone = [replace(problem, profile=d, domains=(d,), weights=()) for d in problem.domains] \
        if len(problem.domains) > 1 else []
    return [get_solver(name)(p, {}).phy2log for name in names for p in [problem, *alone]]


def layer_budgets(max_moves: int, num_layers: int) -> list[int]:
    """`max_moves` split over the layers as evenly as integers allow (the first layers get the remainder)."""
    assert max_moves >= 0 and num_layers >= 1
    share, extra = divmod(max_moves, num_layers)
    return [share + (layer < extra) for layer in range(num_layers)]


def search_layers(phy2log: np.ndarray, problem: PlacementProblem, cost: CostModel, steps: list[Steps],
                  dispatch: Dispatch, reference: np.ndarray | None, budgets: Sequence[int], deadline: float,
                  rng: np.random.Generator) -> int:
    """Local search, layer by layer, `budgets[layer]` moves each, stopped early only by the safety cap
    `deadline` (time.perf_counter() seconds): `propose` moves kept when the combined objective on `steps`
    (scored with `dispatch`, reference [D] as in PlacementProblem.combine) drops. Improves phy2log [L, P]
    in place; returns the number of moves scored (sum(budgets) unless the cap bound)."""
    separable = problem.dataflow != "expert_to_expert"
    scores = step_objective(phy2log, problem, cost, steps, dispatch)  # [D, L]
    src = [np.broadcast_to(np.arange(d.ids.shape[1]) % problem.num_gpus, d.ids.shape[:2]) for d in steps]
    moves = 0
    for layer in range(problem.num_layers):
        search = LayerSearch(problem, cost, layer, steps, src, dispatch)
        rest = scores.sum(1) - scores[:, layer]  # [D] the other layers
        current, busy = search.evaluate(phy2log[layer])
        best = problem.combine(rest + current, reference)
        load = problem.load[layer]
        for _ in range(budgets[layer]):
            if time.perf_counter() >= deadline:
                break
            row = propose(phy2log[layer], busy, load, problem.slots_per_gpu, rng)
            times, row_busy = search.evaluate(row)
            moves += 1
            score = problem.combine(rest + times, reference)
            if score < best:
                best, busy, phy2log[layer], current = score, row_busy, row, times
        scores[:, layer] = current
        if not separable and layer < problem.num_layers - 1:
            src = search.next_src(phy2log[layer])
    return moves


def solve_steptail(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """Local search on the per-step tail objective of the profile (see module docstring).

    options: max_moves (MAX_MOVES, the work budget), seed (0), time_limit_s (TIME_CAP_S, a safety cap on
    the search), warm_starts (null: solver_names(warm_start=True)), search_dispatch (null: SEARCH_DISPATCH of the problem's
    dispatch), max_search_steps (8 per domain, evenly spaced).
    """
    start = time.perf_counter()
    max_moves = int(options.get("max_moves", MAX_MOVES))
    limit = float(options.get("time_limit_s", TIME_CAP_S))
    if max_moves < 0 or limit <= 0:
        raise ValueError(f"steptail: max_moves={max_moves} must be >= 0 and time_limit_s={limit} > 0 "
                         f"(max_moves is the work budget, time_limit_s only a safety cap)")
    rng = np.random.default_rng(int(options.get("seed", 0)))
    trace = problem.profile
    cost = cost_model(problem.topology, trace.hidden_size, trace.moe_intermediate_size)
    steps = profile_steps(problem)
    search_steps = [domain.subset(int(options.get("max_search_steps", 8))) for domain in steps]
    dispatch = str(options.get("search_dispatch") or SEARCH_DISPATCH[problem.dispatch])
    contiguous = get_solver("contiguous")(problem, {}).phy2log if problem.robust == "worst" else None

    def reference(on: list[Steps], how: str) -> np.ndarray | None:
        """robust=worst: each domain's time with the contiguous layout [D]; else None (weighted mean)."""
        return None if contiguous is None else step_objective(contiguous, problem, cost, on, how).sum(1)

    def objective(phy: np.ndarray, how: str, ref: np.ndarray | None) -> float:
        return problem.combine(step_objective(phy, problem, cost, steps, how).sum(1), ref)

    full_ref, search_ref = reference(steps, dispatch), reference(search_steps, dispatch)

    names = options.get("warm_starts")
    warm = warm_start_maps(problem, solver_names(warm_start=True) if names is None else names)
    warm_scores = [step_objective(phy, problem, cost, steps, dispatch) for phy in warm]  # [D, L] each
    separable = problem.dataflow != "expert_to_expert"
    warm_totals = [problem.combine(s.sum(1), full_ref) for s in warm_scores]
    phy2log = best_rows(warm, warm_scores, warm_totals, separable, problem)
    warm_objective = float(min(warm_totals))
    budgets = layer_budgets(max_moves, problem.num_layers)
    moves = search_layers(phy2log, problem, cost, search_steps, dispatch, search_ref, budgets,
                          time.perf_counter() + limit, rng)
    found = objective(phy2log, dispatch, full_ref)
    if found > warm_objective:
        phy2log, found = warm[int(np.argmin(warm_totals))].copy(), warm_objective
    final_ref = full_ref if dispatch == problem.dispatch else reference(steps, problem.dispatch)
    final = found if dispatch == problem.dispatch else objective(phy2log, problem.dispatch, final_ref)
    assert (logical_replica_count(phy2log, problem.num_experts) > 0).all(), "every expert keeps a slot"
    return finish(problem, phy2log, "steptail", start, status="heuristic", objective=final,
                  bound=lower_bound(problem, cost, steps, final_ref), fill=False,
                  objective_kind="profile_step_time_s" if final_ref is None else "worst_domain_time_vs_contiguous",
                  dataflow=problem.dataflow, dispatch=problem.dispatch, search_dispatch=dispatch,
                  search_objective=found, warm_objective=warm_objective, moves=moves, max_moves=max_moves,
                  budget_bound_by="moves" if moves == max_moves else "time")
