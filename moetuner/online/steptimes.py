"""Step times from the simulator, each (placement, step) simulated once and cached."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moetuner.online.stream import StepKey, Stream
from moetuner.costmodel.cost import CostModel
from moetuner.costmodel.simulator import primary_column, simulate


def placement_id(phy2log: np.ndarray) -> str:
    """A content hash of a [L, P] map (the cache key of a placement)."""
    return hashlib.sha1(np.ascontiguousarray(phy2log, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class StepLayerTimes:
    """One step under one placement: per layer all-to-all (scatter + combine) and compute tail. [L] each"""

    a2a_s: np.ndarray
    compute_s: np.ndarray

    @property
    def layer_s(self) -> np.ndarray:
        return self.a2a_s + self.compute_s

    @property
    def step_s(self) -> float:
        return float(self.layer_s.sum())


@dataclass
class StepTimes:
    """Simulated step times of a stream on one topology, cached by (placement, step)."""

    stream: Stream
    cost: CostModel
    num_gpus: int
    num_experts: int
    dataflow: str
    dispatch: str
    cache: dict[tuple[str, StepKey], StepLayerTimes] = field(default_factory=dict)
    simulated: int = 0  # steps actually simulated (cache misses)

    def get(self, phy2log: np.ndarray, key: StepKey) -> StepLayerTimes:
        """Per-layer times of step `key` under placement phy2log [L, P]."""
        index = (placement_id(phy2log), key)
        if index not in self.cache:
            ids, weights = self.stream.step_routing(key)
            result = simulate(phy2log, self.num_gpus, ids, primary_column(ids, weights), self.num_experts, self.cost,
                              self.stream.step_tokens, dataflow=self.dataflow, dispatch=self.dispatch)
            self.cache[index] = StepLayerTimes((result.scatter_s + result.combine_s)[0], result.compute_tail_s[0])
            self.simulated += 1
        return self.cache[index]

    def mean_layers(self, phy2log: np.ndarray, keys: Sequence[StepKey]) -> np.ndarray:
        """Mean per-layer time over steps `keys` (each distinct step simulated once). -> [L]"""
        return np.mean([self.get(phy2log, k).layer_s for k in keys], axis=0)
