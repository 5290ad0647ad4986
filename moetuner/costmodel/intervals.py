"""Confidence intervals of a speedup: a paired bootstrap over the scored steps (docs/simulator.md, "Intervals").

Two placements scored on the same routing have one time per step each (the same steps: consecutive
windows of `step_tokens` tokens, made of whole held-out sequences and the parts of those at the
edges). A resample draws steps with replacement, the same draws for both placements (paired), and
the speedup of that resample is the ratio of their mean step times; the interval is the central
`level` share of the resampled speedups (percentile bootstrap). Resampling steps, not sequences,
keeps the simulated per-step times: resampling sequences would rebuild every step and re-run the
simulator (and each per-batch LP) per resample.

Such an interval is conditional on one split of the trace into profile and held-out sequences and on
one solve. Over several re-splits by sequence (`split.seeds`), `split_speedup_interval` resamples the
splits, then the steps within each drawn split (paired), so the interval also covers how much the
speedup moves with the split; `beaten_in_every_split` is the condition for calling a placement faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def bootstrap_speedups(base_s: np.ndarray, placement_s: np.ndarray, resamples: int = RESAMPLES,
                       seed: int = SEED) -> np.ndarray:
    """Speedup (mean base time / mean placement time) of each paired resample of the steps.
    base_s [S], placement_s [S] -> [resamples]"""
    base_s, placement_s = np.asarray(base_s, dtype=float), np.asarray(placement_s, dtype=float)
    assert base_s.shape == placement_s.shape and base_s.ndim == 1 and len(base_s) > 0, \
        f"paired step times needed, got {base_s.shape} and {placement_s.shape}"
    assert resamples >= 1
    draws = np.random.default_rng(seed).integers(0, len(base_s), size=(resamples, len(base_s)))
    return base_s[draws].mean(1) / placement_s[draws].mean(1)


def speedup_interval(base_s: np.ndarray, placement_s: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = LEVEL) -> tuple[float, float]:
    """[low, high]: the central `level` interval of the paired bootstrap speedup of placement over base.
    base_s [S], placement_s [S] (seconds per step, the same steps). A placement against itself gives
    exactly (1.0, 1.0)."""
    assert 0 < level < 1
    speedups = bootstrap_speedups(base_s, placement_s, resamples, seed)
    low, high = np.quantile(speedups, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def distinguishable(interval: tuple[float, float] | list[float]) -> bool:
    """Whether the interval excludes 1.0 (a speedup neither side of which is 1)."""
    low, high = interval
    return bool(low > 1.0 or high < 1.0)


def split_speedup_interval(base_s: Sequence[np.ndarray], placement_s: Sequence[np.ndarray],
                           resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """[low, high]: the central `level` interval of the speedup over re-splits. base_s[d], placement_s[d]: the
    two placements' times of split d's held-out steps [S_d] (each solved on split d's profile). A resample
    draws D splits with replacement, then each drawn split's steps with replacement (the same draws for
    both placements); its speedup is the ratio of the mean times over all drawn steps."""
    assert len(base_s) == len(placement_s) >= 1 and 0 < level < 1 and resamples >= 1
    base = [np.asarray(b, dtype=float) for b in base_s]
    ours = [np.asarray(p, dtype=float) for p in placement_s]
    assert all(b.shape == p.shape and b.ndim == 1 and len(b) for b, p in zip(base, ours)), "paired steps per split"
    rng = np.random.default_rng(seed)
    speedups = np.empty(resamples)
    for r in range(resamples):
        splits = rng.integers(0, len(base), size=len(base))
        draws = [(d, rng.integers(0, len(base[d]), size=len(base[d]))) for d in splits]
        speedups[r] = (sum(base[d][i].sum() for d, i in draws) / sum(ours[d][i].sum() for d, i in draws))
    low, high = np.quantile(speedups, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def beaten_in_every_split(speedups: Sequence[float]) -> bool:
    """Whether a placement is faster than its rival in every split (each split's speedup above 1)."""
    assert len(speedups) >= 1
    return bool(all(s > 1.0 for s in speedups))
