"""Step times of a stream's steps under a placement: computed in chunks, cached per placement.

Every chunk is scored by `moetuner.costmodel.score.score` (method `auto`: the batched path for `dynamic`
and `static`, the simulator step by step for `lp` and `lp_comm`, which pay their decision on every
replicated layer-step as `moetuner-simulate` charges them, `charge`). Each placement keeps its per-step,
per-layer times [S, L] for the steps asked so far; the least recently used placements are dropped beyond
`keep` of them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from moetuner.costmodel.charges import DispatchCharge
from moetuner.costmodel.cost import CostModel
from moetuner.costmodel.score import score
from moetuner.placement import ExpertLocation, expert_location
from moetuner.online.stream import Stream
from moetuner.costmodel.settings import Dataflow, Dispatch


def placement_id(phy2log: np.ndarray) -> str:
    """A content hash of a [L, P] map (the cache key of a placement)."""
    return hashlib.sha1(np.ascontiguousarray(phy2log, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class StepLayerTimes:
    """Steps under one placement: per layer all-to-all (scatter + combine), compute tail and the per-batch
    decision's charge (0 unless lp or lp_comm). [n, L] each"""

    a2a_s: np.ndarray
    compute_s: np.ndarray
    decision_s: np.ndarray

    @property
    def layer_s(self) -> np.ndarray:
        """[n, L]"""
        return self.a2a_s + self.compute_s + self.decision_s

    @property
    def step_s(self) -> np.ndarray:
        """[n]"""
        return self.layer_s.sum(-1)


@dataclass
class _Cached:
    a2a: np.ndarray  # [S, L]
    compute: np.ndarray  # [S, L]
    decision: np.ndarray  # [S, L]
    done: np.ndarray  # [S] bool
    location: ExpertLocation  # the placement's maps, built once


@dataclass
class StepTimes:
    """Simulated step times of a stream on one topology, cached by placement."""

    stream: Stream
    cost: CostModel
    num_gpus: int
    num_experts: int
    dataflow: Dataflow
    dispatch: Dispatch
    charge: DispatchCharge = DispatchCharge()  # what lp / lp_comm pay per layer-step
    chunk: int = 64  # steps computed together (the replay asks one step and gets the chunk ahead)
    keep: int = 24  # placements whose times stay cached
    cache: OrderedDict[str, _Cached] = field(default_factory=OrderedDict)
    simulated: int = 0  # steps actually computed (cache misses)
    priced_layer_steps: int = 0  # layer-steps asked of `times`, cached or not (a decision's counted work)

    def _entry(self, phy2log: np.ndarray) -> _Cached:
        key = placement_id(phy2log)
        if key not in self.cache:
            S, L = self.stream.num_steps, phy2log.shape[0]
            self.cache[key] = _Cached(np.zeros((S, L)), np.zeros((S, L)), np.zeros((S, L)), np.zeros(S, dtype=bool),
                                      expert_location(phy2log, self.num_gpus, self.num_experts))
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]

    def _compute(self, entry: _Cached, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(all-to-all, compute tail, decision charge) [n, L] each for steps [n], `chunk` steps at a time"""
        a2a, compute, decision = [], [], []
        for i in range(0, len(steps), self.chunk):
            ids, weights = self.stream.steps_routing(steps[i:i + self.chunk])
            got = score(entry.location, ids, weights, self.cost, self.stream.step_tokens, self.dataflow,
                        self.dispatch, self.charge, method="auto")
            a2a.append(got.result.scatter_s + got.result.combine_s)
            compute.append(got.result.compute_tail_s)
            decision.append(got.charges.total_s)
        return np.concatenate(a2a), np.concatenate(compute), np.concatenate(decision)

    def times(self, phy2log: np.ndarray, steps: np.ndarray, ahead: int = 0) -> StepLayerTimes:
        """Per-layer times of `steps` [n] under phy2log [L, P]; with `ahead`, also the next `ahead` steps
        after the last one are computed now (the replay's prefetch)."""
        steps = np.asarray(steps, dtype=np.int64)
        entry = self._entry(phy2log)
        self.priced_layer_steps += len(steps) * phy2log.shape[0]
        missing = np.unique(steps[~entry.done[steps]])
        if ahead and len(missing):
            missing = np.union1d(missing, np.arange(missing.max(), min(missing.max() + ahead, self.stream.num_steps)))
            missing = missing[~entry.done[missing]]
        if len(missing):
            entry.a2a[missing], entry.compute[missing], entry.decision[missing] = self._compute(entry, missing)
            entry.done[missing] = True
            self.simulated += len(missing)
        return StepLayerTimes(entry.a2a[steps], entry.compute[steps], entry.decision[steps])

    def step(self, phy2log: np.ndarray, step: int) -> tuple[float, float]:
        """(all-to-all, total) seconds of one step, computing a chunk ahead on a miss."""
        got = self.times(phy2log, np.array([step]), ahead=self.chunk)
        return float(got.a2a_s[0].sum()), float(got.step_s[0])

    def mean_layers(self, phy2log: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Mean per-layer time over `steps`. -> [L]"""
        return self.times(phy2log, steps).layer_s.mean(0)
