"""What every placement solver receives: the profile statistics, the topology and the engine settings.

A problem is built from one profile trace or from several (domains) with weights: `load`,
`transitions` and `coactivation` are then the weighted mean of each domain's per-token statistics,
scaled to the total token count (weights equal to the token shares give exactly the statistics of
the concatenated trace). Solvers that score steps (steptail) evaluate each domain's own steps and
combine them with `robust`: `mean` (weighted mean) or `worst` (the domain slowest relative to its
contiguous layout, i.e. the smallest speedup).

A problem can also be built from a load profile (`from_load_profile`: loads per expert read from an
engine's load dump, `moetuner.load_profile`): `load` is then the profile's, and `transitions` and
`coactivation`, which need token-level routing, raise ProblemError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from moetuner.profiling.stats import coactivation, expert_load, transitions
from moetuner.costmodel.settings import check_choice, check_dataflow, check_dispatch
from moetuner.topology import Topology, TopologyError
from moetuner.load_profile import LoadProfile
from moetuner.trace import Trace

ROBUST = ("mean", "worst")


class ProblemError(ValueError):
    """A placement problem's inputs disagree; the message names the problem and the fix."""


def concat_traces(traces: Sequence[Trace]) -> Trace:
    """One trace holding every token of `traces` in order, sequence ids kept distinct.

    All traces must come from one model shape (experts, layers, top-k, hidden sizes); gate weights
    are kept only when every trace has them. [T_d, L, k] each -> [sum T_d, L, k]
    """
    first = traces[0]
    shape = lambda t: (t.num_experts, t.num_layers, t.top_k, t.hidden_size, t.moe_intermediate_size)  # noqa: E731
    for trace in traces[1:]:
        if shape(trace) != shape(first):
            raise ProblemError(
                f"profile traces disagree: {first.source!r} has (experts, layers, top_k, hidden, "
                f"intermediate) = {shape(first)} but {trace.source!r} has {shape(trace)}; a multi-domain "
                f"profile needs traces of one model")
    if len(traces) == 1:
        return first
    offsets = np.cumsum([0] + [int(t.seq_ids.max()) + 1 if t.num_tokens else 0 for t in traces[:-1]])
    weights = None if any(t.topk_weights is None for t in traces) else \
        np.concatenate([t.topk_weights.astype(np.float32) for t in traces])
    return replace(first, topk_ids=np.concatenate([t.topk_ids for t in traces]),
                   seq_ids=np.concatenate([t.seq_ids + np.int32(o) for t, o in zip(traces, offsets)]),
                   topk_weights=weights, source="+".join(t.source for t in traces))


def domain_weights(traces: Sequence[Trace], weights: Sequence[float] | None) -> tuple[float, ...]:
    """Weights normalised to sum 1; None gives every domain the same weight."""
    if weights is None or len(weights) == 0:
        return tuple(1.0 / len(traces) for _ in traces)
    if len(weights) != len(traces):
        raise ProblemError(f"{len(weights)} trace weight(s) for {len(traces)} trace(s); give one weight "
                           f"per trace (trace_weights=[...]) or none for equal weights")
    w = np.asarray(weights, dtype=float)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ProblemError(f"trace weights {list(weights)} must be >= 0 with a positive sum")
    return tuple(float(x) for x in w / w.sum())


@dataclass(frozen=True)
class PlacementProblem:
    """Place the experts of `profile`'s model on `topology`, `replicas` extra slots per GPU per layer.

    `domains` (with `weights`) are the profile traces of a multi-domain problem, `profile` their
    concatenation; a single-trace problem has domains == (profile,). `dispatch` and `dataflow` are
    what the engine does (how tokens pick replicas, how they travel); solvers that can use them do.
    """

    profile: Trace  # the routing the placement is computed from (never the evaluation tokens)
    topology: Topology
    replicas: int = 0
    step_tokens: int = 4096  # tokens per serving step, for per-step objectives
    dispatch: str = "dynamic"
    dataflow: str = "dispatch_combine"
    domains: tuple[Trace, ...] = ()
    weights: tuple[float, ...] = ()
    robust: str = "mean"
    load_counts: np.ndarray | None = None  # float [L, E] of a load profile (then `profile` has no tokens)

    def __post_init__(self) -> None:
        if not self.domains:
            object.__setattr__(self, "domains", (self.profile,))
        object.__setattr__(self, "weights", domain_weights(self.domains, self.weights or None))
        check_choice("robust", self.robust, ROBUST, ProblemError)
        check_dispatch(self.dispatch, ProblemError)
        check_dataflow(self.dataflow, ProblemError)
        self.topology.check_fits(self.profile.num_experts)
        self.topology.slots_per_gpu(self.profile.num_experts, self.replicas)  # raises if over the cap

    @classmethod
    def from_traces(cls, traces: Sequence[Trace], topology: Topology, weights: Sequence[float] | None = None,
                    **kwargs: Any) -> "PlacementProblem":
        """A problem over one or several profile traces (domains); weights None = equal per domain."""
        traces = tuple(traces)
        if not traces:
            raise ProblemError("no profile trace given; pass trace=PATH or trace=[PATH,PATH,...]")
        return cls(concat_traces(traces), topology, domains=traces, weights=tuple(weights or ()), **kwargs)

    @classmethod
    def from_load_profile(cls, profile: LoadProfile, topology: Topology, **kwargs: Any) -> "PlacementProblem":
        """A problem over a load profile's loads (summed over its steps); no token-level statistics."""
        return cls(profile.shape_trace(), topology, load_counts=profile.load.astype(float), **kwargs)

    @property
    def load_only(self) -> bool:
        """True for a problem from a load profile: loads per expert, no co-activation or transitions."""
        return self.load_counts is not None

    def _needs_tokens(self, what: str) -> None:
        if self.load_only:
            raise ProblemError(f"{what} needs token-level routing (which experts each token chose), and the "
                               f"profile {self.profile.source!r} is a load profile with expert loads only; "
                               f"solve it with a load-only solver or give a routing trace")

    @property
    def num_layers(self) -> int:
        return self.profile.num_layers

    @property
    def num_experts(self) -> int:
        return self.profile.num_experts

    @property
    def num_gpus(self) -> int:
        return self.topology.num_gpus

    @property
    def slots_per_gpu(self) -> int:
        """S = ceil(E / G) + replicas."""
        return self.topology.slots_per_gpu(self.num_experts, self.replicas)

    @property
    def num_slots(self) -> int:
        """P = G * S physical slots per layer."""
        return self.num_gpus * self.slots_per_gpu

    def weighted(self, stat: Callable[[Trace], np.ndarray]) -> np.ndarray:
        """T * sum_d w_d * stat(d) / T_d: the weighted mean per-token statistic at the total token count."""
        total = sum(d.num_tokens for d in self.domains)
        if len(self.domains) == 1:
            return stat(self.domains[0]).astype(float)
        return sum(w * stat(d).astype(float) * (total / max(d.num_tokens, 1))
                   for d, w in zip(self.domains, self.weights))

    @cached_property
    def load(self) -> np.ndarray:
        """Tokens routed to each expert (weighted over domains). float [L, E]"""
        if self.load_counts is not None:
            return self.load_counts
        return self.weighted(lambda t: expert_load(t.topk_ids, self.num_experts))

    @cached_property
    def transitions(self) -> np.ndarray:
        """Inter-layer transition counts over the k x k product (weighted over domains). float [L-1, E, E]"""
        self._needs_tokens("the transition statistic")
        return self.weighted(lambda t: transitions(t.topk_ids, self.num_experts))

    @cached_property
    def coactivation(self) -> np.ndarray:
        """Tokens choosing both e1 and e2 in a layer (weighted over domains). float [L, E, E]"""
        self._needs_tokens("the co-activation statistic")
        return self.weighted(lambda t: coactivation(t.topk_ids, self.num_experts))

    def combine(self, per_domain: np.ndarray, reference: np.ndarray | None = None) -> float:
        """One objective from per-domain values [D]: the weighted mean, or with robust=worst the worst
        domain: max of values / reference [D] (each domain against its own reference time, e.g. the
        contiguous layout's, so a domain that is slow for every placement does not decide alone)."""
        values = np.asarray(per_domain, dtype=float)
        if self.robust == "worst":
            return float((values / (1.0 if reference is None else np.asarray(reference))).max())
        return float(values @ np.asarray(self.weights))


__all__ = ["PlacementProblem", "ProblemError", "ROBUST", "concat_traces", "TopologyError"]
