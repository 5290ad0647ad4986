"""Emulate a target topology (e.g. h200_2x8) on this machine, at its full rank count, time-dilated.

Every rank is its own process in its own network namespace (`netns.RankNetwork`). With dilation D,
the emulated cluster runs D times slower than the target, uniformly:
- links: each rank's intra- and inter-node port runs at the target's bandwidth / D, scaled by the
  bytes a replayed row really carries over the bytes the target's row carries (`row_scale`: float32
  rows of hidden / shape_scale values plus meta columns, vs bf16 rows of `hidden` values);
- latency: the kernel has no `netem`, so latency is emulated in the exchange: a rank starts its
  payload D x the largest link latency among the peers it sends to or receives from after the
  exchange's start, the latest modelled clock of all ranks (the simulator's phases start together
  and charge each phase the largest latency once); every receive is posted before any payload
  leaves, and each rank sends in a staggered order (`staggered_peers`, ep_moe.posted_all_to_all);
- compute (`compute=timed`): a rank holds each active expert slot for D x f(n) (the simulator's
  `CostModel.expert_time`, roofline or the topology's calibration) and computes nothing, so the
  CPU is left to the communication, which is real. `compute=gemm` runs today's CPU GEMMs instead
  (then compute is measured, not modelled, and is not dilated).
The target's time is the measured time / D. D must be large enough that the emulation's own CPU
work (serialisation, copies, the kernel's network stack) does not show in the result: that work
is roughly fixed per step, so it shrinks as 1 / D in target time; `converged_dilation` picks the
smallest D that a run at 2 x D confirms (`cpu_share` reports how busy the cores were).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from moetuner.serving.replay import ReplaySettings, step_ranges
from moetuner.costmodel.cost import CostModel, cost_model
from moetuner.costmodel.score import score
from moetuner.costmodel.simulator import SimResult
from moetuner.placement import expert_location
from moetuner.topology import Topology
from moetuner.trace import Trace

COMPUTE_MODES = ("timed", "gemm")
META_BYTES = 8  # int64 meta columns of ep_moe.exchange


class EmulationError(ValueError):
    """The emulation settings cannot work; the message says which and what to change."""


@dataclass(frozen=True)
class EmulationSettings:
    """`emulation` block of conf/serve.yaml."""

    enabled: bool | str = False  # true | false | auto (shaped where namespaces can be made, else loopback)
    dilation: float | str = "auto"  # D, or auto: the smallest D whose result a 2x larger D confirms
    compute: str = "timed"  # timed | gemm
    auto_start: float = 1000.0  # auto: the first D probed (then doubled)
    auto_tolerance: float = 0.05  # auto: D is enough when 2 x D changes the target time by at most this
    auto_max: float = 64000.0  # auto: the largest D probed

    def check(self) -> None:
        if str(self.enabled).lower() not in ("true", "false", "auto"):
            raise EmulationError(f"emulation.enabled={self.enabled!r}; choose true, false or auto")
        if self.compute not in COMPUTE_MODES:
            raise EmulationError(f"emulation.compute={self.compute!r}; choose one of {list(COMPUTE_MODES)}")
        if self.dilation != "auto" and not float(self.dilation) >= 1:
            raise EmulationError(f"emulation.dilation={self.dilation!r}; give a number >= 1 or auto")
        if not (0 < self.auto_tolerance < 1 and 1 <= self.auto_start <= self.auto_max):
            raise EmulationError(f"emulation.auto_tolerance={self.auto_tolerance} must be in (0, 1) and "
                                 f"1 <= auto_start={self.auto_start} <= auto_max={self.auto_max}")


def wire_row_bytes(hidden_values: int, top_k: int) -> int:
    """Bytes one replayed row carries in the emulation (ep_moe layout, float32 values): a dispatch row,
    x [hidden + k gate weights] + meta [token, next rank, sender's row, k local slots] (int64); the
    other rows (combine, relays) are smaller and zero-padded to the same size (RankEmulator.row_bytes)."""
    return 4 * (hidden_values + top_k) + META_BYTES * (3 + top_k)


def row_scale(trace: Trace, shape_scale: int, cost: CostModel) -> float:
    """Emulated row bytes / target row bytes (cost.token_bytes: bf16 hidden values)."""
    hidden = max(1, trace.hidden_size // shape_scale)
    return wire_row_bytes(hidden, trace.top_k) / cost.token_bytes


def link_rates(topology: Topology, cost: CostModel, dilation: float, scale: float) -> tuple[float, float]:
    """(intra, inter) payload B/s of an emulated rank port: target bandwidth / D x row scale.

    Uses the cost model's bandwidths (the topology's, or its calibration's)."""
    if topology.bandwidth_matrix is not None:
        raise EmulationError(f"topology {topology.name} has a bandwidth_matrix; the emulation shapes one "
                             f"intra- and one inter-node rate per rank (remove the matrix)")
    bw = cost.bandwidth
    intra = float(bw[0, 1]) if topology.gpus_per_node > 1 else float(topology.intra_node_bw)
    inter = float(bw[0, topology.gpus_per_node]) if topology.nodes > 1 else float(topology.inter_node_bw)
    return intra / dilation * scale, inter / dilation * scale


def sleep_until(deadline: float) -> None:
    """Sleep until time.perf_counter() reaches `deadline` (no-op when past)."""
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


def staggered_peers(world: int, per_node: int, rank: int) -> list[int]:
    """The peers of `rank` in send order: on every node, local rank (own local rank + i) mod n at
    step i, so at each step of a port's queue every receiver has one sender."""
    peer = np.arange(world)
    shift = (peer % per_node - rank % per_node) % per_node
    hop = (peer // per_node - rank // per_node) % (world // per_node)
    return [int(p) for p in np.argsort(shift * world + hop, kind="stable") if p != rank]


class RankEmulator:
    """One rank's dilated latency and timed compute (ep_moe's exchange hook, and an ExpertFn).

    The emulator keeps the rank's modelled clock: the end of the last modelled event (a payload
    received, a timed expert done, the step's start). Every modelled wait is a deadline from that
    clock, not a sleep from now: latency ends D x lat after the clock, a timed slot D x f(n) after
    it. The emulation's own CPU work between events (packing rows, the counts all-to-all, Python
    glue) then runs inside the wait instead of adding to it, as long as it is shorter.
    """

    def __init__(self, cost: CostModel, dilation: float, rank: int, row_bytes: int = 0) -> None:
        self.cost, self.dilation, self.rank = cost, float(dilation), rank
        self.row_bytes = row_bytes  # exchange rows are padded to this many bytes
        self.clock = time.perf_counter()
        self.send_order = staggered_peers(cost.num_gpus, cost.gpus_per_node, rank)

    def start_step(self) -> None:
        """A step starts now (after the replay's barrier)."""
        self.clock = time.perf_counter()

    def before_payload(self, send_counts: torch.Tensor, recv_counts: torch.Tensor, start: float) -> None:
        """Exchange hook: wait until D x (largest latency to a peer with rows either way) after the
        exchange's start (the latest clock of all ranks; the simulator's phases start together)."""
        peers = ((send_counts > 0) | (recv_counts > 0)).numpy().copy()
        peers[self.rank] = False
        self.clock = max(self.clock, start)
        if peers.any():
            self.clock += self.dilation * float(self.cost.latency[self.rank, peers].max())
            sleep_until(self.clock)

    def after_payload(self) -> None:
        """Exchange hook: this rank has its rows; the clock moves to now."""
        self.clock = time.perf_counter()

    def expert(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Timed expert (ExpertFn): hold the slot until D x f(len(x)) after the clock; x back unchanged."""
        self.clock += self.dilation * float(self.cost.expert_time(np.array(len(x))))
        sleep_until(self.clock)
        return x


def served_window(num_tokens: int, settings: ReplaySettings) -> slice:
    """Trace tokens of the measured steps of a replay (replay.step_ranges after the warm-up)."""
    steps = list(step_ranges(num_tokens, settings))
    return slice(steps[settings.warmup_steps][1], steps[-1][2])


def predict_served(trace: Trace, phy2log: np.ndarray, cost: CostModel, settings: ReplaySettings) -> SimResult:
    """The cost model (costmodel.score) on exactly the measured steps of a replay (same dataflow and dispatch).
    The replay makes lp / lp_comm's decision on this CPU, undilated, so the prediction is the free time
    (no decision charge)."""
    window = served_window(trace.num_tokens, settings)
    weights = None if trace.topk_weights is None else trace.topk_weights[window]
    return score(expert_location(phy2log, cost.num_gpus, trace.num_experts), trace.topk_ids[window], weights, cost,
                 settings.step_tokens, settings.dataflow, settings.dispatch).result


def add_predictions(table: pd.DataFrame, sim: SimResult, warmup_steps: int, dilation: float) -> pd.DataFrame:
    """per_layer rows with the prediction beside each measurement, in the same (dilated) seconds.

    predicted_layer_s is the simulator's layer time (scatter + compute tail + combine): every rank's
    layer ends with the combine, so a rank's measured layer time includes waiting for the tail;
    predicted_combine_s = predicted_layer_s - dispatch - this rank's compute, as measured.
    """
    step = table["step"].to_numpy() - warmup_steps
    layer, rank = table["layer"].to_numpy(), table["rank"].to_numpy()
    out = table.copy()
    out["predicted_scatter_s"] = dilation * sim.scatter_s[step, layer]
    out["predicted_compute_s"] = dilation * sim.compute_s[step, layer, rank]
    out["predicted_layer_s"] = dilation * sim.layer_time_s[step, layer]
    out["predicted_combine_s"] = out["predicted_layer_s"] - out["predicted_scatter_s"] - out["predicted_compute_s"]
    return out


def predict_transfers(trace: Trace, phy2log: np.ndarray, cost: CostModel, settings: ReplaySettings) -> SimResult:
    """The simulator on the measured steps with every latency zeroed: its scatter and combine are the
    bytes-only part of each phase, the part the emulation does not wait out from the model."""
    return predict_served(trace, phy2log, replace(cost, latency=np.zeros_like(cost.latency)), settings)


def injected_seconds(sim: SimResult, transfers: SimResult, compute: str) -> float:
    """Seconds per step of the prediction that the emulation waits out from the cost model itself: the
    latency part of every phase (prediction minus its bytes-only twin), and with compute=timed the
    compute tail too (timed slots hold D x f(n)). Mean over steps of the sum over layers."""
    latency = (sim.scatter_s + sim.combine_s - transfers.scatter_s - transfers.combine_s).sum(1)
    timed = sim.compute_tail_s.sum(1) if compute == "timed" else 0.0
    return float((latency + timed).mean())


def emulation_metrics(measured_s: float, sim: SimResult, transfers: SimResult, dilation: float, ranks: int,
                      compute: str, shaped: bool) -> dict[str, float | bool]:
    """metrics.json fields: D, ranks, whether the links were shaped, the target's measured and predicted
    MoE-layer time per step and their relative error, and what of it was measured:
    injected_share (the share of the prediction the emulation waits out from the model, injected_seconds),
    and with compute=timed the transfer part alone, measured (target time minus the injected waits) and
    predicted (prediction minus them), and its relative error comm_rel_error. Unshaped links leave the
    transfers unpaced, so those runs measure nothing of the target (emulation_shaped false)."""
    target = measured_s / dilation
    predicted = sim.metrics()["layer_time_s"]
    injected = injected_seconds(sim, transfers, compute)
    out: dict[str, float | bool] = {
        "dilation": float(dilation), "ranks": int(ranks), "emulation_shaped": bool(shaped),
        "target_moe_layer_time_s": target, "predicted_moe_layer_time_s": predicted,
        "prediction_rel_error": (target - predicted) / predicted, "injected_s": injected,
        "injected_share": injected / predicted}
    if compute == "timed":
        measured_comm, predicted_comm = target - injected, predicted - injected
        out.update(measured_comm_s=measured_comm, predicted_comm_s=predicted_comm,
                   comm_rel_error=(measured_comm - predicted_comm) / predicted_comm)
    return out


def shaped_run(metrics: dict) -> bool:
    """Whether a serve run's metrics.json measured its links: every run that is not emulated (a real
    cluster, or a plain run), and emulated runs whose links were shaped. Emulated runs on unshaped
    loopback (emulation.enabled=auto without root) are not."""
    if "dilation" not in metrics:
        return True
    return bool(metrics.get("emulation_shaped", metrics.get("emulated_network", False)))


def cpu_share(cpu_s: float, wall_s: float, cores: int) -> float:
    """Share of the machine's cores the ranks used: summed CPU seconds / (cores x wall seconds)."""
    return cpu_s / (cores * wall_s) if wall_s > 0 else float("nan")


def converged_dilation(probes: list[tuple[float, float]], tolerance: float) -> float | None:
    """The smallest probed D whose target time the next (2x larger) D reproduces within `tolerance`.

    probes: (D, target seconds) in increasing D. The emulation's own overhead shrinks as 1 / D in target
    time, so once doubling D no longer moves the result, the smaller D already measures the target."""
    for (d, t), (_, t_next) in zip(probes, probes[1:]):
        if abs(t - t_next) <= tolerance * t_next:
            return d
    return None


def target_cost(topology: Topology, trace: Trace) -> CostModel:
    """The target's cost model for the trace's expert shape (full size: shape_scale does not apply)."""
    return cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
