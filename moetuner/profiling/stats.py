"""Routing statistics of a trace: the single implementation every stage uses.

From topk_ids [T, L, k]:
  load          P [L, E]        tokens routed to expert e in layer l
  transitions   R [L-1, E, E]   (e1 in layer l, e2 in layer l+1) pairs over the full k x k
                                product: each token contributes k*k pairs per layer pair
  coactivation  C [L, E, E]     tokens that chose both e1 and e2 (e1 != e2) in layer l;
                                symmetric, zero diagonal
  step_load     [S, L, E]       load of each full batch of `step_tokens` consecutive tokens
                                (S = T // step_tokens; the last T % step_tokens tokens are left out)
Summaries per layer: imbalance (max/mean load), normalised entropy of the load, affinity (how often
a token routed to e1 in layer l also picks e1's top successor in layer l+1, `follow_rate`) and its
independence baseline (the same if layer l+1 ignored layer l), per-step imbalance.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moetuner.atomic import atomic_path
from moetuner.trace import Trace

PROFILE_FORMAT = "moetuner-profile/1"


class ProfileError(ValueError):
    """A profile cannot be computed or read; the message names the problem and the fix."""


@dataclass(frozen=True)
class Profile:
    """Routing statistics of one trace (shapes in the module docstring)."""

    load: np.ndarray  # int64 [L, E]
    transitions: np.ndarray  # int64 [L-1, E, E]
    coactivation: np.ndarray  # int64 [L, E, E]
    step_load: np.ndarray  # int64 [S, L, E]
    step_tokens: int
    top_k: int
    num_tokens: int
    num_sequences: int
    meta: dict[str, object] = field(default_factory=dict)  # model, source, moe_layers, ...

    @property
    def num_layers(self) -> int:
        return int(self.load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[1])


def expert_load(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens per expert and layer. ids [..., L, k] -> [L, E]"""
    L = ids.shape[-2]
    flat = (np.arange(L)[:, None] * num_experts + ids.reshape(-1, L, ids.shape[-1])).ravel()
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """Counts of (a[t, i], b[t, j]) over tokens t and all slot pairs (i, j). a [T, ka], b [T, kb] -> [E, E]"""
    flat = (a[:, :, None].astype(np.int64) * num_experts + b[:, None, :]).ravel()
    return np.bincount(flat, minlength=num_experts * num_experts).reshape(num_experts, num_experts)


def transitions(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Inter-layer transition counts over the k x k product. ids [T, L, k] -> [L-1, E, E]"""
    L = ids.shape[1]
    out = np.zeros((max(L - 1, 0), num_experts, num_experts), dtype=np.int64)
    for layer in tqdm(range(L - 1), desc="transitions", unit="layer", disable=L < 16):
        out[layer] = pair_counts(ids[:, layer], ids[:, layer + 1], num_experts)
    return out


def coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens choosing both e1 and e2 (e1 != e2) in a layer. ids [T, L, k] -> [L, E, E], symmetric"""
    first, second = np.triu_indices(ids.shape[2], k=1)  # each unordered slot pair once
    out = np.zeros((ids.shape[1], num_experts, num_experts), dtype=np.int64)
    for layer in tqdm(range(ids.shape[1]), desc="co-activation", unit="layer", disable=ids.shape[1] < 16):
        flat = ids[:, layer, first].astype(np.int64) * num_experts + ids[:, layer, second]
        once = np.bincount(flat.ravel(), minlength=num_experts * num_experts).reshape(num_experts, num_experts)
        out[layer] = once + once.T
        np.fill_diagonal(out[layer], 0)
    return out


def step_load(ids: np.ndarray, num_experts: int, step_tokens: int) -> np.ndarray:
    """Load of each full batch of step_tokens consecutive tokens. ids [T, L, k] -> [S, L, E]"""
    assert step_tokens >= 1, "step_tokens must be >= 1"
    steps = ids.shape[0] // step_tokens
    if steps == 0:
        raise ProfileError(f"step_tokens={step_tokens} exceeds the trace's {ids.shape[0]} tokens; "
                           f"choose step_tokens <= {ids.shape[0]}")
    L, k = ids.shape[1:]
    batched = ids[:steps * step_tokens].reshape(steps, step_tokens, L, k)
    base = (np.arange(steps)[:, None, None, None] * L + np.arange(L)[None, None, :, None]) * num_experts
    flat = (base + batched).ravel()
    return np.bincount(flat, minlength=steps * L * num_experts).reshape(steps, L, num_experts)


def compute_profile(trace: Trace, step_tokens: int) -> Profile:
    """All statistics of `trace`, with batches of `step_tokens` tokens for the per-step load."""
    ids, E = trace.topk_ids, trace.num_experts
    return Profile(
        load=expert_load(ids, E), transitions=transitions(ids, E), coactivation=coactivation(ids, E),
        step_load=step_load(ids, E, step_tokens), step_tokens=step_tokens, top_k=trace.top_k,
        num_tokens=trace.num_tokens, num_sequences=len(trace.sequences),
        meta={"model": trace.model, "source": trace.source, "moe_layers": list(trace.moe_layers),
              "dataset": trace.extra.get("dataset", "")})


def imbalance(load: np.ndarray) -> np.ndarray:
    """max / mean over the last axis (experts); 1 is perfectly balanced. [..., E] -> [...]"""
    mean = load.mean(axis=-1)
    return np.divide(load.max(axis=-1), mean, out=np.ones_like(mean, dtype=float), where=mean > 0)


def normalised_entropy(load: np.ndarray) -> np.ndarray:
    """Entropy of each row's share divided by log(E); 1 is uniform. [..., E] -> [...]"""
    share = load / np.maximum(load.sum(axis=-1, keepdims=True), 1)
    logs = np.log(share, out=np.zeros_like(share, dtype=float), where=share > 0)
    return -(share * logs).sum(axis=-1) / np.log(load.shape[-1])


def follow_rate(transitions: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Share of (token, layer-l expert e1) routings whose token also picks e1's top successor
    in layer l+1: sum_e1 max_e2 R[l, e1, e2] / sum_e1 P[l, e1]. 1 = a deterministic successor map.
    transitions [L-1, E, E], load [L, E] -> [L-1]"""
    return transitions.max(axis=2).sum(axis=1) / np.maximum(load[:-1].sum(axis=1), 1)


def independent_follow_rate(load: np.ndarray, top_k: int) -> np.ndarray:
    """follow_rate if layer l+1 ignored layer l: the share of tokens that pick layer l+1's most
    popular expert. load [L, E] -> [L-1]"""
    tokens = load[1:].sum(axis=1) / top_k
    return load[1:].max(axis=1) / np.maximum(tokens, 1)


def summarize(profile: Profile) -> dict[str, object]:
    """Per-layer summaries (lists) and the scalar metrics logged to MLflow."""
    layer_imbalance = imbalance(profile.load)
    entropy = normalised_entropy(profile.load)
    affinity = follow_rate(profile.transitions, profile.load)
    baseline = independent_follow_rate(profile.load, profile.top_k)
    step_imbalance = imbalance(profile.step_load)  # [S, L]
    has_pairs = len(affinity) > 0
    metrics = {
        "mean_imbalance": float(layer_imbalance.mean()), "max_imbalance": float(layer_imbalance.max()),
        "mean_entropy": float(entropy.mean()),
        "mean_affinity": float(affinity.mean()) if has_pairs else 0.0,
        "mean_affinity_baseline": float(baseline.mean()) if has_pairs else 0.0,
        "mean_step_imbalance": float(step_imbalance.mean()), "max_step_imbalance": float(step_imbalance.max()),
        "num_tokens": profile.num_tokens, "num_sequences": profile.num_sequences,
        "num_steps": int(profile.step_load.shape[0]),
    }
    per_layer = {"imbalance": layer_imbalance.tolist(), "entropy": entropy.tolist(),
                 "affinity": affinity.tolist(), "affinity_baseline": baseline.tolist(),
                 "step_imbalance_mean": step_imbalance.mean(axis=0).tolist()}
    return {"metrics": metrics, "per_layer": per_layer, "step_tokens": profile.step_tokens,
            "top_k": profile.top_k, **profile.meta}


_ARRAYS = ("load", "transitions", "coactivation", "step_load")


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write the profile as one .npz (counts as int32), atomically."""
    path = Path(path)
    assert path.suffix == ".npz", "a profile file ends in .npz"
    header = {"format": PROFILE_FORMAT, "step_tokens": profile.step_tokens, "top_k": profile.top_k,
              "num_tokens": profile.num_tokens, "num_sequences": profile.num_sequences, "meta": profile.meta}
    assert profile.num_tokens < np.iinfo(np.int32).max, "counts are stored as int32"
    with atomic_path(path) as tmp:  # uncompressed: zlib took 12 s on a DeepSeek-V3-sized profile
        np.savez(tmp, header=np.array(json.dumps(header)),
                 **{name: getattr(profile, name).astype(np.int32) for name in _ARRAYS})
    return path


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read a profile written by save_profile; a bad file raises ProfileError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile; make one with moetuner-profile trace=... out=DIR")
    try:
        with np.load(path) as data:
            header = json.loads(str(data["header"]))
            arrays = {name: data[name].astype(np.int64) for name in _ARRAYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ProfileError(f"{path}: not a readable moetuner profile (truncated, or not from "
                           f"moetuner-profile?): {err}") from err
    if header.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path}: format {header.get('format')!r}, expected {PROFILE_FORMAT!r}")
    return Profile(**arrays, step_tokens=header["step_tokens"], top_k=header["top_k"],
                   num_tokens=header["num_tokens"], num_sequences=header["num_sequences"], meta=header["meta"])


def trace_tags(trace: Trace) -> dict[str, str]:
    """MLflow tags naming a trace's model and dataset."""
    return {"model": trace.model, "dataset": trace.extra.get("dataset", trace.source)}


def trace_sizes(trace: Trace, prefix: str = "") -> dict[str, int]:
    """A trace's sizes as metrics: tokens, sequences, layers, experts, top_k."""
    sizes = {"num_tokens": trace.num_tokens, "num_sequences": len(trace.sequences),
             "num_layers": trace.num_layers, "num_experts": trace.num_experts, "top_k": trace.top_k}
    return {f"{prefix}{k}": v for k, v in sizes.items()}
