"""What moving expert weights costs: transfers, conflict-free rounds, and the time serving loses.

An expert that a GPU holds in the new placement but not in the old one (same layer) is copied from a
GPU that holds it in the old one: the one with the fastest link to the destination, then the one with
the fewest bytes to send so far. One expert is 3 x hidden x intermediate x 2 bytes (bf16 gate, up and
down projections). Transfers run in rounds in which each GPU talks to at most one peer (vLLM's
`migration_scheduler.py`): a pair exchanges everything it has for each other in one round, both
directions at once (links are full duplex); a round lasts as long as its slowest pair, bytes over the
link's bandwidth plus its latency. Rounds are built greedily, longest pair first.

Modes (`migration.mode`):
- `stop_the_world`: serving waits for every round at full bandwidth.
- `overlapped`: the transfers take `bandwidth_share` of every link, so they last 1 / share as long,
  while serving goes on under the old placement with its all-to-all slowed by 1 / (1 - share); the new
  placement takes effect at the first step after the last round ends.

In both modes every redeployment also stops serving for `overhead_s` (default 0) when the new placement
takes effect: the engine's fixed cost of a rebalance (map update, weight re-layout, CUDA-graph recapture).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from moetuner.costmodel.cost import BYTES_PER_VALUE, CostModel

MODES = ("stop_the_world", "overlapped")


class MigrationError(ValueError):
    """Bad migration settings or placements that cannot be migrated between."""


@dataclass(frozen=True)
class MigrationConfig:
    mode: str = "stop_the_world"
    bandwidth_share: float = 0.5  # overlapped only: share of each link the transfers take
    overhead_s: float = 0.0  # serving stops this long at every redeployment (map update, re-layout, recapture)

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> "MigrationConfig":
        unknown = sorted(set(cfg) - {"mode", "bandwidth_share", "overhead_s"})
        if unknown:
            raise MigrationError(f"migration: unknown key(s) {unknown}; known: mode, bandwidth_share, overhead_s")
        out = MigrationConfig(str(cfg.get("mode", "stop_the_world")), float(cfg.get("bandwidth_share", 0.5)),
                              float(cfg.get("overhead_s", 0.0)))
        if not out.overhead_s >= 0.0:
            raise MigrationError(f"migration.overhead_s={out.overhead_s}; seconds per rebalance, it must be >= 0")
        if out.mode not in MODES:
            raise MigrationError(f"migration.mode={out.mode!r}; choose one of {list(MODES)}")
        if not 0.0 < out.bandwidth_share < 1.0:
            raise MigrationError(f"migration.bandwidth_share={out.bandwidth_share}; it must be in (0, 1)")
        return out


def expert_bytes(hidden_size: int, intermediate_size: int) -> float:
    """Bytes of one expert's weights: gate, up and down projections in bf16."""
    return 3.0 * hidden_size * intermediate_size * BYTES_PER_VALUE


def holds(row: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """Which GPU holds which expert in one layer. row [P] -> bool [G, E]"""
    out = np.zeros((num_gpus, num_experts), dtype=bool)
    gpu = np.arange(len(row)) // (len(row) // num_gpus)
    out[gpu[row >= 0], row[row >= 0]] = True
    return out


def transfers(old: np.ndarray, new: np.ndarray, num_gpus: int, cost: CostModel) -> np.ndarray:
    """Expert copies needed to go from `old` to `new`: pair counts [G, G] (src, dst). old, new [L, P]"""
    if old.shape != new.shape:
        raise MigrationError(f"placements of shapes {old.shape} and {new.shape} cannot be migrated between; "
                             f"both need the same layers and slots")
    copies = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    num_experts = int(max(old.max(), new.max())) + 1
    for layer in range(old.shape[0]):
        before, after = holds(old[layer], num_gpus, num_experts), holds(new[layer], num_gpus, num_experts)
        for dst, e in zip(*np.nonzero(after & ~before)):  # by destination, then expert
            holders = np.flatnonzero(before[:, e])
            if not len(holders):
                raise MigrationError(f"layer {layer}: expert {e} is in the new placement but on no GPU of "
                                     f"the old one; every expert must stay placed")
            src = min(holders, key=lambda g: (-cost.bandwidth[g, dst], copies[g].sum(), g))
            copies[src, dst] += 1
    return copies


@dataclass(frozen=True)
class Migration:
    """A scheduled migration: how much moves and the rounds it takes."""

    experts_moved: int
    bytes_moved: float
    round_bw_s: tuple[float, ...]  # per round, the slowest pair's bytes / bandwidth at full bandwidth
    round_latency_s: tuple[float, ...]  # per round, the slowest pair's latency

    @property
    def rounds(self) -> int:
        return len(self.round_bw_s)

    def duration_s(self, share: float = 1.0) -> float:
        """Wall time of all rounds when the transfers get `share` of every link."""
        return float(sum(bw / share + lat for bw, lat in zip(self.round_bw_s, self.round_latency_s)))


NO_MIGRATION = Migration(0, 0.0, (), ())


def schedule(copies: np.ndarray, cost: CostModel, bytes_per_expert: float) -> Migration:
    """Rounds of pairwise exchanges, each GPU in at most one pair per round. copies [G, G] (src, dst)"""
    volume = copies * bytes_per_expert
    seconds = volume / cost.bandwidth  # diagonal 0 / inf = 0
    pairs = []
    for u in range(len(copies)):
        for v in range(u + 1, len(copies)):
            if copies[u, v] or copies[v, u]:
                pairs.append((max(seconds[u, v], seconds[v, u]), float(cost.latency[u, v]), u, v))
    pairs.sort(key=lambda p: (-(p[0] + p[1]), p[2], p[3]))
    round_bw, round_lat = [], []
    while pairs:
        busy: set[int] = set()
        taken, rest = [], []
        for pair in pairs:
            if pair[2] in busy or pair[3] in busy:
                rest.append(pair)
            else:
                taken.append(pair)
                busy.update(pair[2:])
        slowest = max(taken, key=lambda p: p[0] + p[1])
        round_bw.append(slowest[0])
        round_lat.append(slowest[1])
        pairs = rest
    return Migration(int(copies.sum()), float(volume.sum()), tuple(round_bw), tuple(round_lat))


def plan_migration(old: np.ndarray, new: np.ndarray, num_gpus: int, cost: CostModel,
                   bytes_per_expert: float) -> Migration:
    """Transfers from `old` to `new` [L, P], scheduled in rounds."""
    return schedule(transfers(old, new, num_gpus, cost), cost, bytes_per_expert)


def wait_s(migration: Migration, config: MigrationConfig) -> float:
    """Seconds serving waits for a redeployment: the transfers when stopping the world (none when
    overlapped), plus the fixed `overhead_s`."""
    return (migration.duration_s() if config.mode == "stop_the_world" else 0.0) + config.overhead_s


def slots_changed(old: np.ndarray, new: np.ndarray) -> int:
    """Slots whose expert differs between two placements (a relabelled slot counts). old, new [L, P]"""
    return int((np.asarray(old) != np.asarray(new)).sum())


def overlap_s(migration: Migration, config: MigrationConfig) -> float:
    """Seconds the transfers run beside serving (overlapped mode), at `bandwidth_share` of the links."""
    return migration.duration_s(config.bandwidth_share) if config.mode == "overlapped" else 0.0


def slowed_step_s(a2a_s: float, other_s: float, config: MigrationConfig) -> float:
    """A step's time while transfers take `bandwidth_share` of the links: all-to-all x 1 / (1 - share)."""
    return other_s + a2a_s / (1.0 - config.bandwidth_share)
