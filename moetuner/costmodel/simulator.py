"""Per-step cost model of expert-parallel MoE serving (docs/formulation.md section 3).

A trace's tokens are cut into steps of `step_tokens` consecutive tokens (a trailing partial step is
left out). Token j of a step lives on home GPU j % G (attention is data parallel). In every MoE layer
each token-expert pair is served by one replica of the expert (the `dispatch` picks it, DISPATCHES:
`dynamic` even split, `static` nearest fixed replica, `lp` min busiest GPU, `lp_comm` min predicted
layer time), then:

- compute: a GPU's time is `CostModel.gpu_compute` of its active slots' token counts: the sum over
  them of the expert time f(n) of the topology's expert model (cost.py: `roofline`,
  `calibrated_linear` or `efficiency`, which also pays each grouped GEMM's kernel latency once per
  GPU that serves a token); the layer pays the slowest GPU (the compute tail).
- communication, one copy of a token per distinct destination GPU, none to the GPU the token is on.
  An all-to-all phase costs `cost.a2a_time`: max over GPUs of max(send, receive), with the topology's
  link model (`serial` or `concurrent`), latency and per-message cost.
  - `dispatch_combine`: scatter from home to the token's expert GPUs, combine the same copies back.
  - `expert_to_expert`: layer 0 scatters from home; the combine gathers the k partial results on
    the GPU of the token's primary expert (largest gate weight, else the first listed), which is
    where the next layer scatters from; the last layer combines back to home.
  - `hierarchical` (DeepEP's normal kernels): home to experts and back like dispatch_combine, but a
    token crosses to another node once per destination node, to the relay GPU of its own local rank
    there; scatter = inter-node phase (home -> relays) + intra-node phase (home -> own-node expert
    GPUs, relay -> its node's expert GPUs); the combine runs the two phases backwards (partial sums
    reduced on the relay). Under the `concurrent` link model the two phases are pipelined: each
    direction costs the larger of them instead of their sum.
  - `low_latency` (DeepEP's decode kernels): every token-expert pair is its own copy, sent straight
    from home to the expert's GPU (no dedup per GPU, no NVLink forwarding), and combined back the same way.
  One copy is `scatter_bytes` out and `combine_bytes` back (cost.phase_bytes; bf16 unless calibrated).
- layer time = scatter + compute tail + combine; step time = sum over layers. What `lp` and
  `lp_comm`'s per-batch decision costs is charged on top of these times (charges.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from moetuner.costmodel.cost import (CostModel, SimulationError, a2a_time, copy_matrix, needed_gpus, pair_copy_matrix,
                                     phases, relay_copies)
from moetuner.costmodel.replicas import choose_step_slots
from moetuner.costmodel.settings import DATAFLOWS, Dataflow, Dispatch, check_dataflow, check_dispatch
from moetuner.placement import LayerSlots, Placement, check_placement, expert_location, routed_experts

@dataclass(frozen=True)
class LayerStep:
    """One layer of one step."""

    scatter_s: float
    combine_s: float
    compute_s: np.ndarray  # [G]
    tokens: np.ndarray  # [G] token-expert pairs served
    bytes_intra: float
    bytes_inter: float
    out_gpu: np.ndarray  # [B] where each token's activation is after the combine
    choose_s: float = 0.0  # wall seconds choose_slots took for this layer (what a per-batch decision costs here)

    @property
    def time_s(self) -> float:
        return self.scatter_s + float(self.compute_s.max()) + self.combine_s


def layer_step(slot: np.ndarray, src: np.ndarray, target: np.ndarray, slots: LayerSlots, cost: CostModel,
               dataflow: Dataflow = "dispatch_combine") -> LayerStep:
    """Times and bytes of one layer whose pairs are served by slot [B, k]: tokens at src [B] scatter,
    their partial results combine on target [B]."""
    num_gpus = cost.num_gpus
    out_bytes, back_bytes = cost.phase_bytes
    dest = slots.gpu_of_slot[slot]  # [B, k]
    if dataflow == "hierarchical":
        inter, intra = relay_copies(src, needed_gpus(dest, num_gpus), cost)
        scatter_s = phases(a2a_time(inter, cost, out_bytes), a2a_time(intra, cost, out_bytes), cost)
        combine_s = phases(a2a_time(intra.T, cost, back_bytes), a2a_time(inter.T, cost, back_bytes), cost)
        out = back = inter + intra
    else:
        if dataflow == "low_latency":  # a copy per pair
            out = pair_copy_matrix(src, dest, num_gpus)
            back = pair_copy_matrix(target, dest, num_gpus).T
        else:  # a copy per GPU a token needs
            on = needed_gpus(dest, num_gpus)
            out = copy_matrix(src, on)
            back = copy_matrix(target, on).T
        scatter_s, combine_s = a2a_time(out, cost, out_bytes), a2a_time(back, cost, back_bytes)
    per_slot = np.bincount(slot.ravel(), minlength=slots.num_slots)
    cross = cost.node[:, None] != cost.node[None, :]
    moved = lambda where: float(out[where].sum() * out_bytes + back[where].sum() * back_bytes)  # noqa: E731
    return LayerStep(scatter_s=scatter_s, combine_s=combine_s, compute_s=cost.gpu_compute(per_slot),
                     tokens=per_slot.reshape(num_gpus, -1).sum(1).astype(float),
                     bytes_intra=moved(~cross), bytes_inter=moved(cross), out_gpu=target)


def simulate_step(ids: np.ndarray, primary: np.ndarray, slots: list[LayerSlots], cost: CostModel,
                  dataflow: Dataflow, dispatch: Dispatch) -> list[LayerStep]:
    """Every layer of one step; token j starts on home GPU j % G. ids [B, L, k], primary [B, L]"""
    assert dataflow in DATAFLOWS, f"unknown dataflow {dataflow}"
    num_tokens, num_layers = ids.shape[:2]
    timings: list[float] = []
    chosen = choose_step_slots(ids, primary, slots, cost, dataflow, dispatch, timings)
    token = np.arange(num_tokens)
    home = token % cost.num_gpus
    src, out = home, []
    for layer in range(num_layers):
        to_home = dataflow != "expert_to_expert" or layer == num_layers - 1
        target = home if to_home else slots[layer].gpu_of_slot[chosen[token, layer, primary[:, layer]]]
        out.append(replace(layer_step(chosen[:, layer], src, target, slots[layer], cost, dataflow),
                           choose_s=timings[layer]))
        src = target
    return out


@dataclass(frozen=True)
class SimResult:
    """Per step s and layer l (and GPU g) of a simulation."""

    scatter_s: np.ndarray  # [S, L]
    combine_s: np.ndarray  # [S, L]
    compute_s: np.ndarray  # [S, L, G]
    tokens: np.ndarray  # [S, L, G] token-expert pairs per GPU
    bytes_intra: np.ndarray  # [S, L]
    bytes_inter: np.ndarray  # [S, L]
    choose_s: np.ndarray | None = None  # [S, L] wall seconds of choose_slots (machine-dependent; charges.py)

    @property
    def compute_tail_s(self) -> np.ndarray:
        """[S, L]"""
        return self.compute_s.max(-1)

    @property
    def layer_time_s(self) -> np.ndarray:
        """scatter + compute tail + combine. [S, L]"""
        return self.scatter_s + self.compute_tail_s + self.combine_s

    @property
    def tail_ratio(self) -> np.ndarray:
        """max / mean tokens per GPU. [S, L]"""
        mean = self.tokens.mean(-1)
        return np.divide(self.tokens.max(-1), mean, out=np.ones_like(mean), where=mean > 0)

    def metrics(self) -> dict[str, float]:
        """Scalars: means over steps of per-step sums over layers (seconds, bytes), and ratios."""
        step_time = self.layer_time_s.sum(1)
        return {
            "layer_time_s": float(step_time.mean()),
            "layer_time_max_step_s": float(step_time.max()),
            "a2a_time_s": float((self.scatter_s + self.combine_s).sum(1).mean()),
            "scatter_time_s": float(self.scatter_s.sum(1).mean()),
            "compute_time_s": float(self.compute_tail_s.sum(1).mean()),
            "compute_mean_s": float(self.compute_s.mean(-1).sum(1).mean()),
            "compute_tail_ratio": float(self.tail_ratio.mean()),
            "bytes_intra_per_step": float(self.bytes_intra.sum(1).mean()),
            "bytes_inter_per_step": float(self.bytes_inter.sum(1).mean()),
            "num_steps": int(step_time.shape[0]),
        }

    def per_layer(self) -> dict[str, np.ndarray]:
        """Columns of the per-layer table (means over steps). Each [L]"""
        return {
            "scatter_s": self.scatter_s.mean(0), "compute_tail_s": self.compute_tail_s.mean(0),
            "compute_mean_s": self.compute_s.mean(-1).mean(0), "combine_s": self.combine_s.mean(0),
            "layer_time_s": self.layer_time_s.mean(0), "tail_ratio": self.tail_ratio.mean(0),
            "bytes_intra": self.bytes_intra.mean(0), "bytes_inter": self.bytes_inter.mean(0),
        }


def check_inputs(phy2log: np.ndarray, num_gpus: int, ids: np.ndarray, num_experts: int, cost: CostModel,
                 step_tokens: int, dataflow: Dataflow, dispatch: Dispatch) -> None:
    """Raise SimulationError (PlacementError for the map itself) naming the first disagreement."""
    check_dataflow(dataflow, SimulationError)
    check_dispatch(dispatch, SimulationError)
    check_placement(Placement(phy2log, num_gpus, 1, "simulated"), cost.num_gpus, num_experts, ids.shape[1],
                    routed=routed_experts(ids, num_experts))
    if not 1 <= step_tokens <= ids.shape[0]:
        raise SimulationError(f"step_tokens={step_tokens} but the trace has {ids.shape[0]} tokens; "
                              f"choose 1 <= step_tokens <= {ids.shape[0]}")


def simulate(phy2log: np.ndarray, num_gpus: int, ids: np.ndarray, primary: np.ndarray, num_experts: int,
             cost: CostModel, step_tokens: int, dataflow: Dataflow = "dispatch_combine",
             dispatch: Dispatch = "dynamic", progress: bool = False) -> SimResult:
    """Every full step of `step_tokens` consecutive tokens. phy2log [L, P], ids [T, L, k], primary [T, L]"""
    check_inputs(phy2log, num_gpus, ids, num_experts, cost, step_tokens, dataflow, dispatch)
    slots = expert_location(phy2log, num_gpus, num_experts).layers()
    steps = []
    for start in tqdm(range(0, ids.shape[0] - step_tokens + 1, step_tokens), desc=f"simulate {dispatch}",
                      unit="step", disable=not progress):
        window = slice(start, start + step_tokens)
        steps.append(simulate_step(ids[window].astype(np.int64), primary[window], slots, cost, dataflow, dispatch))
    field = lambda name: np.array([[getattr(layer, name) for layer in step] for step in steps])  # noqa: E731
    return SimResult(scatter_s=field("scatter_s"), combine_s=field("combine_s"), compute_s=field("compute_s"),
                     tokens=field("tokens"), bytes_intra=field("bytes_intra"), bytes_inter=field("bytes_inter"),
                     choose_s=field("choose_s"))
