"""Score a placement: the one call behind every number (moetuner-simulate, the online step times, steptail,
the regime figure, the serve predictions and the benchmarks).

`score` cuts the routing into steps, times every layer-step with the simulator (or the batched path,
costmodel/batched.py, where it reproduces the simulator) and charges `lp` / `lp_comm` their per-batch
decision (costmodel/charges.py). It returns the per-step, per-layer times charged and free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.costmodel.batched import BATCHED_DISPATCHES, check_batched, simulate_batched
from moetuner.costmodel.charges import Charges, DispatchCharge, charged_metrics, charged_step_times, layer_charges
from moetuner.costmodel.cost import CostModel, SimulationError
from moetuner.costmodel.settings import check_choice
from moetuner.costmodel.replicas import choose_slots
from moetuner.costmodel.simulator import LayerStep, SimResult, check_inputs, layer_step, simulate
from moetuner.placement import ExpertLocation, LayerSlots
from moetuner.trace import primary_column

METHODS = ("simulator", "batched", "auto")
"""simulator: step by step (every dispatch); batched: chunks of steps (dynamic, static; others refused);
auto: batched where it applies, else the simulator."""
CHUNK_STEPS = 64  # steps the batched path computes together


@dataclass(frozen=True)
class Scored:
    """A placement's times on a run of steps: the simulation and the decision charges."""

    result: SimResult  # [S, L] (compute_s, tokens [S, L, G])
    charges: Charges  # [S, L] zero unless lp / lp_comm on a replicated layer

    @property
    def step_s(self) -> np.ndarray:
        """Charged seconds per step. [S]"""
        return charged_step_times(self.result, self.charges)

    @property
    def free_layer_s(self) -> np.ndarray:
        """Seconds of every layer-step without the decision. [S, L]"""
        return self.result.layer_time_s

    @property
    def free_step_s(self) -> np.ndarray:
        """Seconds per step without the decision. [S]"""
        return self.result.layer_time_s.sum(1)

    def metrics(self) -> dict[str, float]:
        """The scalars of moetuner-simulate (charges.charged_metrics)."""
        return charged_metrics(self.result, self.charges)


def score(location: ExpertLocation, ids: np.ndarray, weights: np.ndarray | None, cost: CostModel, step_tokens: int,
          dataflow: str = "dispatch_combine", dispatch: str = "dynamic", charge: DispatchCharge = DispatchCharge(),
          method: str = "simulator", progress: bool = False, primary: np.ndarray | None = None) -> Scored:
    """Every full step of `step_tokens` consecutive tokens of ids [T, L, k] (gate weights [T, L, k] or None:
    they pick each token's primary expert, simulator.primary_column; or give that column, primary [T, L])
    under the placement `location` (placement.expert_location), charged as moetuner-simulate charges it.
    `method`: METHODS (raises SimulationError for a setting the batched path cannot reproduce when asked
    for `batched`)."""
    check_choice("method", method, METHODS, SimulationError)
    charge.check()
    num_experts = location.count.shape[1]
    check_inputs(location.phy2log, location.num_gpus, ids, num_experts, cost, step_tokens, dataflow, dispatch)
    if method == "batched":
        check_batched(dataflow, dispatch)
    primary = primary_column(ids, weights) if primary is None else primary
    if method == "simulator" or dispatch not in BATCHED_DISPATCHES:
        result = simulate(location.phy2log, location.num_gpus, ids.astype(np.int64), primary, num_experts, cost,
                          step_tokens, dataflow, dispatch, progress=progress)
    else:
        result = batched_steps(location, ids, primary, cost, step_tokens, dataflow, dispatch)
    replicated = (location.count > 1).any(1)  # [L]
    return Scored(result, layer_charges(result, dispatch, charge, cost, num_experts, replicated))


def batched_steps(location: ExpertLocation, ids: np.ndarray, primary: np.ndarray, cost: CostModel,
                  step_tokens: int, dataflow: str, dispatch: str, chunk: int = CHUNK_STEPS) -> SimResult:
    """simulate_batched over the full steps of ids [T, L, k] (primary [T, L]), `chunk` steps at a time.
    -> SimResult [S, L]"""
    num_steps = ids.shape[0] // step_tokens
    cut = lambda a: a[:num_steps * step_tokens].reshape(num_steps, step_tokens, *a.shape[1:])  # noqa: E731
    steps, columns = cut(ids), cut(primary)
    parts = [simulate_batched(location, steps[i:i + chunk].astype(np.int64), columns[i:i + chunk], cost, dataflow,
                              dispatch) for i in range(0, num_steps, chunk)]
    return SimResult(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in
                        ("scatter_s", "combine_s", "compute_s", "tokens", "bytes_intra", "bytes_inter")})


def score_layer(ids: np.ndarray, token: np.ndarray, src: np.ndarray, primary: np.ndarray,
                combine_to_home: np.ndarray | None, slots: LayerSlots, cost: CostModel,
                dispatch: str = "dynamic", dataflow: str = "dispatch_combine") -> LayerStep:
    """One layer of one batch (uncharged; the local search's move score): B tokens at GPUs src [B] with
    experts ids [B, k], replicas chosen by `dispatch`.

    combine_to_home: [B] home GPUs to combine back to, or None to combine on the GPU of the
    primary expert (column primary [B] of ids). dataflow hierarchical or low_latency: then
    combine_to_home must be src.
    """
    slot = choose_slots(ids, token, src, slots, dispatch, cost)
    if combine_to_home is None:
        combine_to_home = slots.gpu_of_slot[slot[np.arange(len(src)), primary]]
    return layer_step(slot, src, combine_to_home, slots, cost, dataflow)
