"""Synthetic routing traces with controlled statistics, vectorised and seeded.

Knobs (`SynthSpec`): expert popularity skew (Zipf exponent, a random expert order per layer),
domains whose popularity departs from the shared one by `domain_shift`, inter-layer affinity (with
probability `affinity` a token's layer-(l+1) experts are the images of its layer-l experts under a
fixed per-layer successor permutation), intra-layer co-activation (with probability `coactivation`
a token draws all k experts from one group of `group_size` correlated experts) and sequences of
`seq_len` tokens, each of one domain. Experts are drawn without replacement proportionally to
popularity (sequential sampling), so a token's k experts are always distinct.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from moetuner.trace import N_GROUP, Trace


class SynthError(ValueError):
    """A synthetic-trace knob is out of range; the message names it and its valid range."""


@dataclass(frozen=True)
class SynthSpec:
    """What to generate (defaults: a small DeepSeek-V2-Lite-like trace)."""

    num_tokens: int = 16384
    num_layers: int = 8
    num_experts: int = 64
    top_k: int = 6
    seq_len: int = 256
    skew: float = 1.0  # Zipf exponent of expert popularity; 0 = uniform
    affinity: float = 0.0  # probability a token follows the successor map from layer l to l+1
    coactivation: float = 0.0  # probability a token's k experts come from one group
    group_size: int = 8  # experts per co-activation group; >= top_k and divides num_experts
    num_domains: int = 1
    domain_shift: float = 0.0  # 0: domains share popularity; 1: each domain has its own
    seed: int = 0
    model: str = "synthetic"
    hidden_size: int = 2048
    moe_intermediate_size: int = 1408
    n_group: int = 1  # the model's expert groups (trace metadata n_group; EPLB packs them onto nodes)
    first_dense_layers: int = 0  # dense decoder layers before the MoE layers (the layout engine files are keyed by)

    def check(self) -> "SynthSpec":
        """Raise SynthError naming the first knob out of range; return self."""
        rules = [
            (self.num_tokens >= 1, "num_tokens must be >= 1"),
            (self.num_layers >= 1, "num_layers must be >= 1"),
            (1 <= self.top_k <= self.num_experts, "top_k must be in [1, num_experts]"),
            (self.seq_len >= 1, "seq_len must be >= 1"),
            (self.skew >= 0, "skew (Zipf exponent) must be >= 0"),
            (0 <= self.affinity <= 1, "affinity is a probability, in [0, 1]"),
            (0 <= self.coactivation <= 1, "coactivation is a probability, in [0, 1]"),
            (self.top_k <= self.group_size <= self.num_experts and self.num_experts % self.group_size == 0,
             "group_size must be >= top_k and divide num_experts"),
            (self.num_domains >= 1, "num_domains must be >= 1"),
            (0 <= self.domain_shift <= 1, "domain_shift must be in [0, 1]"),
            (self.num_experts <= np.iinfo(np.int16).max, "num_experts must fit int16"),
            (self.n_group >= 1 and self.num_experts % self.n_group == 0,
             "n_group (the model's expert groups) must be >= 1 and divide num_experts"),
            (self.first_dense_layers >= 0, "first_dense_layers must be >= 0"),
        ]
        for ok, message in rules:
            if not ok:
                raise SynthError(f"{message} (got {self})")
        return self


def zipf_weights(num_experts: int, skew: float) -> np.ndarray:
    """Normalised Zipf weights rank^-skew. [E]"""
    w = np.arange(1, num_experts + 1, dtype=np.float64) ** -skew
    return w / w.sum()


def random_permutations(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Independent random permutations of range(n). [*shape, n]"""
    return np.argsort(rng.random((*shape, n)), axis=-1)


def popularity(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """Expert probabilities per domain and layer. [D, L, E]"""
    z = zipf_weights(spec.num_experts, spec.skew)
    shared = z[random_permutations(rng, (1, spec.num_layers), spec.num_experts)]
    own = z[random_permutations(rng, (spec.num_domains, spec.num_layers), spec.num_experts)]
    return (1 - spec.domain_shift) * shared + spec.domain_shift * own


def draw_distinct(p: np.ndarray, n: int, k: int, rng: np.random.Generator, rounds: int = 6) -> np.ndarray:
    """n rows of k distinct indices of p [m], drawn without replacement proportionally to p. [n, k]

    Each row draws with replacement and keeps its first k distinct draws, which is exactly
    sequential sampling without replacement. Rows still short after `rounds` rounds of k draws
    (a few experts hold most of the mass) finish with an exponential race over the experts they
    lack (the k - got smallest Exp(1) / p), the same distribution.
    """
    assert (p > 0).sum() >= k, "fewer than k experts have positive probability"
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    out = np.full((n, k), -1, dtype=np.int64)
    got = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    for _ in range(rounds):
        rows, count = out[todo], got[todo]
        for draw in np.searchsorted(cdf, rng.random((k, len(todo))), side="right"):
            fresh = np.flatnonzero((count < k) & (rows != draw[:, None]).all(axis=1))
            rows[fresh, count[fresh]] = draw[fresh]
            count[fresh] += 1
        out[todo], got[todo] = rows, count
        todo = todo[count < k]
    if len(todo):
        out[todo] = finish_by_race(p, out[todo], got[todo], rng)
    return out


def finish_by_race(p: np.ndarray, chosen: np.ndarray, got: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Complete rows of `chosen` [n, k] (the first got[i] filled) with the experts that win an
    exponential race (smallest Exp(1) / p) among those not chosen yet, in order of arrival. [n, k]"""
    k = chosen.shape[1]
    with np.errstate(divide="ignore"):
        keys = rng.standard_exponential((len(chosen), len(p)), dtype=np.float32) / p.astype(np.float32)
    row, col = np.nonzero(np.arange(k)[None, :] < got[:, None])
    keys[row, chosen[row, col]] = np.inf
    first = np.argpartition(keys, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(first, np.argsort(np.take_along_axis(keys, first, axis=1), axis=1), axis=1)
    slot = np.arange(k)[None, :] - got[:, None]
    return np.where(slot < 0, chosen, np.take_along_axis(order, np.maximum(slot, 0), axis=1))


def sample_layer(p: np.ndarray, domain: np.ndarray, groups: np.ndarray, spec: SynthSpec,
                 rng: np.random.Generator) -> np.ndarray:
    """Top-k experts [T, k] of one layer; p [D, E] popularity, domain [T], groups [G, g] members.

    A co-activating token first picks a group with probability its popularity mass, then draws
    its k experts inside that group.
    """
    ids = np.empty((len(domain), spec.top_k), dtype=np.int64)
    coact = rng.random(len(domain)) < spec.coactivation
    for d in range(p.shape[0]):
        free = np.flatnonzero((domain == d) & ~coact)
        ids[free] = draw_distinct(p[d], len(free), spec.top_k, rng)
        tied = np.flatnonzero((domain == d) & coact)
        chosen = draw_distinct(p[d][groups].sum(axis=1), len(tied), 1, rng)[:, 0]
        for g, members in enumerate(groups):
            rows = tied[chosen == g]
            ids[rows] = members[draw_distinct(p[d][members], len(rows), spec.top_k, rng)]
    return ids


def synthesize(spec: SynthSpec) -> Trace:
    """A trace of spec.num_tokens tokens with the statistics `spec` asks for."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    T, L, E = spec.num_tokens, spec.num_layers, spec.num_experts
    pop = popularity(spec, rng)  # [D, L, E]
    groups = random_permutations(rng, (L,), E).reshape(L, -1, spec.group_size)  # [L, G, g] members
    successor = random_permutations(rng, (max(L - 1, 0),), E)  # [L-1, E]
    seq_ids = (np.arange(T) // spec.seq_len).astype(np.int32)
    seq_domain = rng.integers(spec.num_domains, size=int(seq_ids[-1]) + 1)
    domain = seq_domain[seq_ids]
    ids = np.empty((T, L, spec.top_k), dtype=np.int16)
    for layer in tqdm(range(L), desc="synth", unit="layer", disable=L < 16):
        ids[:, layer] = sample_layer(pop[:, layer], domain, groups[layer], spec, rng)
        if layer:
            follow = rng.random(T) < spec.affinity
            ids[follow, layer] = successor[layer - 1][ids[follow, layer - 1]]
    dense = spec.first_dense_layers
    return Trace(topk_ids=ids, seq_ids=seq_ids, model=spec.model, num_experts=E, moe_layers=list(range(dense, dense + L)),
                 source=f"synth:seed={spec.seed}", hidden_size=spec.hidden_size,
                 moe_intermediate_size=spec.moe_intermediate_size,
                 extra={"dataset": "synthetic", "num_hidden_layers": str(dense + L), "synth_spec": json.dumps(asdict(spec)),
                        N_GROUP: str(spec.n_group),
                        "sequence_domains": json.dumps(seq_domain.tolist())})
