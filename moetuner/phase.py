"""Serving phases (Hydra group `phase/`): how many tokens a rank holds per step, which kernels move them, and
how a step is built from a trace.

- **prefill**: thousands of tokens per rank on DeepEP's normal kernels, which the project models as the
  `dispatch_combine` dataflow on one node and `hierarchical` across nodes (the form the h800 fit reproduces
  DeepEP's normal tables with, docs/hardware.md); a step holds whole sequences: the trace's tokens in order,
  then, where the trace is too short for `num_steps` steps, further passes over its sequences in a seeded
  random order (sequences recur).
- **decode**: about 128 tokens per rank on DeepEP's low-latency kernels (`low_latency`); a step holds B
  tokens drawn at random positions across sequences, one per sequence while the trace has at least B
  sequences, else every sequence about B / N times (requests recur), so that a step mixes requests as a
  decode batch does. The draws are seeded: the same trace, phase and seed give the same steps.

A phase turns a trace into its **step trace** (`phase_trace`): a trace whose consecutive windows of
`step_tokens` tokens are the phase's steps, so every consumer that cuts windows (solvers, simulator,
bounds) scores the phase's steps unchanged. The calibration block of a preset holds one set of constants
fitted on both kernel families; the phase's dataflow decides through which kernel's form they apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moetuner.costmodel.settings import Dataflow, check_dataflow
from moetuner.topology import Topology
from moetuner.trace import Trace

PHASES = ("prefill", "decode")
NORMAL = "normal"
"""Phase dataflow meaning DeepEP's normal kernels: dispatch_combine on one node, hierarchical on several."""


class PhaseError(ValueError):
    """A phase setting is unknown or inconsistent; the message names it and the fix."""


@dataclass(frozen=True)
class Phase:
    """One serving phase: `tokens_per_rank` per step on each GPU, its `dataflow` (NORMAL or a Dataflow),
    `num_steps` steps drawn from a trace (None: as many whole steps as the trace holds), `seed` for draws."""

    name: str
    tokens_per_rank: int
    dataflow: str
    num_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in PHASES:
            raise PhaseError(f"unknown phase {self.name!r}; choose one of {list(PHASES)} (phase=prefill|decode)")
        if self.tokens_per_rank < 1:
            raise PhaseError(f"phase {self.name}: tokens_per_rank={self.tokens_per_rank} must be >= 1")
        if self.num_steps is not None and self.num_steps < 1:
            raise PhaseError(f"phase {self.name}: num_steps={self.num_steps} must be >= 1 or null (every whole "
                             f"step the trace holds)")
        if self.dataflow != NORMAL:
            check_dataflow(self.dataflow, PhaseError, f"phase {self.name} dataflow")

    def step_tokens(self, topology: Topology) -> int:
        """Tokens per step: tokens_per_rank x GPUs."""
        return self.tokens_per_rank * topology.num_gpus

    def dataflow_on(self, topology: Topology) -> Dataflow:
        """The dataflow on `topology`: NORMAL is dispatch_combine on one node, hierarchical on several."""
        if self.dataflow == NORMAL:
            return "dispatch_combine" if topology.nodes == 1 else "hierarchical"
        return self.dataflow  # type: ignore[return-value]


def phase_from_config(cfg: Mapping[str, Any] | None) -> Phase | None:
    """The Phase of a `phase` config group (None: no phase given)."""
    if cfg is None:
        return None
    steps = cfg.get("num_steps")
    return Phase(str(cfg["name"]), int(cfg["tokens_per_rank"]), str(cfg["dataflow"]),
                 None if steps is None else int(steps), int(cfg.get("seed", 0)))


def step_settings(phase: Phase | None, topology: Topology, step_tokens: int, dataflow: str) -> tuple[int, str]:
    """(step_tokens, dataflow) an app runs with: the phase's on `topology`, else the given ones (no phase)."""
    if phase is None:
        return step_tokens, dataflow
    return phase.step_tokens(topology), phase.dataflow_on(topology)


def sequence_tokens(seq_ids: np.ndarray) -> list[np.ndarray]:
    """Token indices of each sequence, in trace order (sequences by first appearance). seq_ids [T] -> N x [n]"""
    _, first, inverse = np.unique(seq_ids, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    groups = np.split(order, bounds)
    return [groups[i] for i in np.argsort(first, kind="stable")]


def prefill_order(seq_ids: np.ndarray, num_tokens: int, seed: int) -> np.ndarray:
    """Token indices of `num_tokens` prefill tokens: the trace in order, then passes over its whole
    sequences in seeded random orders until enough. seq_ids [T] -> [num_tokens]"""
    assert num_tokens >= 1 and len(seq_ids) >= 1
    sequences = sequence_tokens(seq_ids)
    rng = np.random.default_rng(seed)
    parts, have = [np.arange(len(seq_ids))], len(seq_ids)
    while have < num_tokens:
        parts.extend(sequences[i] for i in rng.permutation(len(sequences)))
        have += len(seq_ids)
    return np.concatenate(parts)[:num_tokens]


def decode_step(sequences: list[np.ndarray], batch: int, rng: np.random.Generator) -> np.ndarray:
    """Token indices of one decode step of `batch` tokens: with N >= batch sequences, one random position in
    each of `batch` distinct sequences; else every sequence batch // N times and batch % N of them once more,
    each at distinct random positions while it has them (a sequence asked for more than its length gives all
    its tokens that many whole times over, plus the rest drawn). In a random order. -> [batch]"""
    n = len(sequences)
    times = np.full(n, batch // n)
    times[rng.choice(n, batch % n, replace=False)] += 1
    picked = []
    for tokens, m in zip(sequences, times):
        whole, rest = divmod(int(m), len(tokens))
        picked.append(np.tile(tokens, whole))
        picked.append(rng.choice(tokens, rest, replace=False))
    out = np.concatenate(picked)
    return out[rng.permutation(len(out))]


def decode_order(seq_ids: np.ndarray, batch: int, num_steps: int, seed: int) -> np.ndarray:
    """Token indices of `num_steps` decode steps of `batch` tokens each (decode_step), seeded.
    seq_ids [T] -> [num_steps * batch]"""
    assert batch >= 1 and num_steps >= 1 and len(seq_ids) >= 1
    sequences = sequence_tokens(seq_ids)
    rng = np.random.default_rng(seed)
    return np.concatenate([decode_step(sequences, batch, rng) for _ in range(num_steps)])


def phase_steps(phase: Phase, num_tokens: int, step_tokens: int) -> int:
    """Steps the phase scores on a trace of `num_tokens` tokens (num_steps, else the whole steps it holds)."""
    if phase.num_steps is not None:
        return phase.num_steps
    if num_tokens < step_tokens:
        raise PhaseError(f"phase {phase.name}: the trace holds {num_tokens} tokens, less than one step of "
                         f"{step_tokens}; give phase.num_steps=N to draw N steps (sequences recur) or lower "
                         f"phase.tokens_per_rank")
    return num_tokens // step_tokens


def phase_trace(trace: Trace, phase: Phase, topology: Topology) -> Trace:
    """The step trace: `trace`'s tokens reordered (and repeated where drawn again) so that its consecutive
    windows of phase.step_tokens(topology) tokens are the phase's steps. [T, L, k] -> [S * B, L, k]"""
    if trace.num_tokens == 0:
        raise PhaseError(f"trace {trace.source!r} has no tokens; a phase builds its steps from routed tokens")
    batch = phase.step_tokens(topology)
    steps = phase_steps(phase, trace.num_tokens, batch)
    order = prefill_order(trace.seq_ids, steps * batch, phase.seed) if phase.name == "prefill" else \
        decode_order(trace.seq_ids, batch, steps, phase.seed)
    weights = None if trace.topk_weights is None else trace.topk_weights[order]
    return replace(trace, topk_ids=trace.topk_ids[order], seq_ids=trace.seq_ids[order], topk_weights=weights,
                   extra={**trace.extra, "phase": phase.name})
