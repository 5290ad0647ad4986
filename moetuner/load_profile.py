"""The load-profile format (`moetuner-load/1`): expert loads read from an engine's load dump, one safetensors file.

Tensor:
  counts  int64 [N, L, E]  tokens routed to each expert of each MoE layer, per recorded step (N = 1 where
                           the dump has no steps)
Header metadata (strings): format, model, num_experts, moe_layers (JSON list of decoder-layer indices),
source; optional num_hidden_layers, and whatever the importer adds (dump format, step ids).

A load profile has no token-level routing: it says how much each expert was used, not which experts a
token chose together, so only the solvers that need loads alone can place from it
(`moetuner.solvers.registry.LOAD_ONLY_SOLVERS`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from moetuner.atomic import atomic_path
from moetuner.profiling.stats import expert_load
from moetuner.trace import N_GROUP, Trace, TraceError

LOAD_FORMAT = "moetuner-load/1"
REQUIRED_METADATA = ("format", "model", "num_experts", "moe_layers", "source")


@dataclass(frozen=True)
class LoadProfile:
    """Tokens per expert of L MoE layers over N steps. counts int64 [N, L, E]"""

    counts: np.ndarray
    model: str
    moe_layers: list[int]
    source: str
    extra: dict[str, str] = field(default_factory=dict)  # further string metadata (num_hidden_layers, ...)

    @property
    def num_steps(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])

    @property
    def load(self) -> np.ndarray:
        """Tokens per expert summed over steps. int64 [L, E]"""
        return self.counts.sum(0)

    def validate(self, name: str = "load profile") -> "LoadProfile":
        """Raise TraceError unless counts are a non-negative int64 [N, L, E] with one MoE layer per row."""
        if self.counts.ndim != 3 or self.counts.dtype != np.int64:
            raise TraceError(f"{name}: counts must be int64 [N, L, E], got {self.counts.dtype} {self.counts.shape}")
        if len(self.moe_layers) != self.counts.shape[1]:
            raise TraceError(f"{name}: moe_layers lists {len(self.moe_layers)} layers but counts has "
                             f"L={self.counts.shape[1]}")
        if self.counts.size and self.counts.min() < 0:
            raise TraceError(f"{name}: negative expert counts")
        if not self.counts.any():
            raise TraceError(f"{name}: every count is zero; record while the engine serves requests")
        return self

    def metadata(self) -> dict[str, str]:
        return {**self.extra, "format": LOAD_FORMAT, "model": self.model, "num_experts": str(self.num_experts),
                "moe_layers": json.dumps([int(x) for x in self.moe_layers]), "source": self.source}

    def shape_trace(self) -> Trace:
        """A trace with no tokens carrying this profile's model metadata (model, experts, layers, extra)."""
        return Trace(topk_ids=np.zeros((0, self.num_layers, 1), np.int16), seq_ids=np.zeros(0, np.int32),
                     model=self.model, num_experts=self.num_experts, moe_layers=list(self.moe_layers),
                     source=self.source, hidden_size=0, moe_intermediate_size=0, extra=dict(self.extra))


def save_load_profile(profile: LoadProfile, path: str | os.PathLike[str]) -> Path:
    """Validate `profile` and write it to `path` atomically."""
    path = Path(path)
    profile.validate(str(path))
    with atomic_path(path) as tmp:
        save_file({"counts": np.ascontiguousarray(profile.counts)}, str(tmp), metadata=profile.metadata())
    return path


def file_format(path: str | os.PathLike[str]) -> str:
    """The `format` metadata of a safetensors file (a trace's or a load profile's); TraceError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file; make a trace with moetuner-extract, moetuner-import or "
                         f"moetuner-synth, or a load profile with moetuner-import format=<engine dump>")
    try:
        with safe_open(str(path), framework="np") as f:
            return str((f.metadata() or {}).get("format", ""))
    except (SafetensorError, OSError, ValueError) as err:
        raise TraceError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err


def load_load_profile(path: str | os.PathLike[str]) -> LoadProfile:
    """Read and validate a load profile; every problem raises TraceError naming the file."""
    path = Path(path)
    if file_format(path) != LOAD_FORMAT:
        raise TraceError(f"{path}: not a {LOAD_FORMAT} file (format {file_format(path)!r})")
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
        counts = f.get_tensor("counts") if "counts" in f.keys() else None
    missing = [k for k in REQUIRED_METADATA if k not in meta] + (["counts tensor"] if counts is None else [])
    if missing:
        raise TraceError(f"{path}: missing {missing}")
    profile = LoadProfile(counts=counts, model=meta["model"], moe_layers=[int(x) for x in json.loads(meta["moe_layers"])],
                          source=meta["source"], extra={k: v for k, v in meta.items() if k not in REQUIRED_METADATA})
    profile.validate(str(path))
    if profile.num_experts != int(meta["num_experts"]):
        raise TraceError(f"{path}: metadata num_experts={meta['num_experts']} but counts has E={profile.num_experts}")
    return profile


def load_profile_of_trace(trace: Trace, step_tokens: int) -> LoadProfile:
    """A trace's expert loads per step of `step_tokens` tokens (the last step may be shorter), as an engine's
    load recorder would count them while serving the trace's requests. [T, L, k] -> counts [N, L, E]"""
    assert step_tokens > 0, "step_tokens must be positive"
    steps = [trace.topk_ids[start:start + step_tokens] for start in range(0, trace.num_tokens, step_tokens)]
    counts = np.stack([expert_load(ids, trace.num_experts) for ids in steps]).astype(np.int64)
    extra = {k: v for k, v in trace.extra.items() if k in ("num_hidden_layers", "dataset", N_GROUP)}
    return LoadProfile(counts=counts, model=trace.model, moe_layers=list(trace.moe_layers),
                       source=f"loads:{trace.source}", extra={**extra, "step_tokens": str(step_tokens)})
