"""What a per-batch dispatch decision costs each layer-step it serves (docs/simulator.md, "Charged dispatch").

`lp` and `lp_comm` (settings.PER_BATCH_DISPATCHES) solve a problem over the whole batch's counts in every
layer of every step, on the critical path: the layer cannot dispatch before the decision. Every
layer-step of such a dispatch whose layer has a replicated expert pays:
- the decision: a stated budget per solve (`budget`, default 100 us: DeepSeek's LPLB reports about
  100 us on one SM for its LP, so a GPU-side solver), or the measured wall time of `choose_slots` on
  this CPU (`measured`: Python + HiGHS, machine-dependent, and noisy on a shared machine);
- the counts exchange the decision needs: an all-gather of the E per-expert counts (int32) of every
  GPU, priced as one all-to-all phase by the cost model's own formula (`a2a_time`): each GPU sends
  E x 4 bytes to each other GPU, so the phase costs the largest latency plus the bytes over the links.
`dynamic` and `static` decide per token from local information and pay nothing; neither does a layer
without a replicated expert (there is nothing to decide).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moetuner.costmodel.cost import CostModel, SimulationError, a2a_time
from moetuner.costmodel.settings import PER_BATCH_DISPATCHES, Dispatch, check_dispatch_charge
from moetuner.costmodel.simulator import SimResult
from moetuner.placement import logical_replica_count

COUNT_BYTES = 4  # one int32 count per expert
LPLB_BUDGET_US = 100.0  # DeepSeek LPLB: about 100 us for its LP on one SM


@dataclass(frozen=True)
class DispatchCharge:
    """How a per-batch decision is charged: `budget` (budget_us per solve) or `measured` (choose_slots' wall time)."""

    kind: str = "budget"
    budget_us: float = LPLB_BUDGET_US

    def check(self) -> None:
        check_dispatch_charge(self.kind, SimulationError)
        if not self.budget_us >= 0:
            raise SimulationError(f"dispatch_budget_us={self.budget_us}; give the solve time in microseconds (>= 0)")


@dataclass(frozen=True)
class Charges:
    """Seconds charged to each layer-step, on top of its scatter + compute tail + combine."""

    solve_s: np.ndarray  # [S, L] the decision
    exchange_s: np.ndarray  # [S, L] the counts all-gather it needs

    @property
    def total_s(self) -> np.ndarray:
        """[S, L]"""
        return self.solve_s + self.exchange_s


def counts_exchange_s(cost: CostModel, num_experts: int) -> float:
    """Seconds of an all-gather of every GPU's E int32 counts: one all-to-all phase of E x 4-byte messages."""
    num_gpus = cost.num_gpus
    messages = np.ones((num_gpus, num_gpus)) - np.eye(num_gpus)  # [G, G] one message to every other GPU
    return a2a_time(messages, replace(cost, token_bytes=float(COUNT_BYTES * num_experts)))


def replicated_layers(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Layers with at least one expert in two or more slots. phy2log [L, P] -> [L] bool"""
    return (logical_replica_count(phy2log, num_experts) > 1).any(1)


def layer_charges(result: SimResult, dispatch: Dispatch, charge: DispatchCharge, cost: CostModel, num_experts: int,
                  replicated: np.ndarray) -> Charges:
    """The charge of every layer-step of `result` (simulated under `dispatch`). replicated [L] bool"""
    charge.check()
    shape = result.scatter_s.shape  # [S, L]
    if dispatch not in PER_BATCH_DISPATCHES:
        return Charges(np.zeros(shape), np.zeros(shape))
    if charge.kind == "measured":
        assert result.choose_s is not None, "measured charge needs the simulator's choose_slots timings"
        solve = np.asarray(result.choose_s, dtype=float)
    else:
        solve = np.full(shape, charge.budget_us * 1e-6)
    on = np.broadcast_to(np.asarray(replicated, dtype=bool), shape)
    return Charges(np.where(on, solve, 0.0), np.where(on, counts_exchange_s(cost, num_experts), 0.0))


def charged_step_times(result: SimResult, charges: Charges) -> np.ndarray:
    """Per step: the sum over layers of scatter + compute tail + combine + charge. [S]"""
    return (result.layer_time_s + charges.total_s).sum(1)


def charged_metrics(result: SimResult, charges: Charges) -> dict[str, float]:
    """result.metrics() with layer_time_s (and its slowest step) charged, plus:
    layer_time_free_s (uncharged), decision_time_s (charge per step, mean over steps), and its parts
    decision_solve_s and decision_exchange_s."""
    metrics = result.metrics()
    free_s = metrics["layer_time_s"]
    decision = charges.total_s.sum(1)  # [S]
    metrics.update(layer_time_free_s=free_s, decision_time_s=float(decision.mean()),
                   decision_solve_s=float(charges.solve_s.sum(1).mean()),
                   decision_exchange_s=float(charges.exchange_s.sum(1).mean()),
                   layer_time_s=free_s + float(decision.mean()),
                   layer_time_max_step_s=float(charged_step_times(result, charges).max()))
    return metrics
