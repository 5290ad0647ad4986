"""The routing-trace format (`moetuner-trace/1`): one safetensors file per trace.

Tensors:
  topk_ids      int16   [T, L, k]  experts each token was routed to in each MoE layer
  topk_weights  float16/float32 [T, L, k]  gate weights (optional)
  seq_ids       int32   [T]        sequence (document/request) of each token
Header metadata (strings): format, model, num_experts, top_k, moe_layers (JSON list of
decoder-layer indices), source, dtype, hidden_size, moe_intermediate_size; optional:
num_hidden_layers (the model's decoder-layer count, dense layers included; engine files need it,
see moetuner.model_layout) and n_group (the model's expert-group count, HF config `n_group`, which
EPLB's hierarchical policy packs onto nodes; absent means 1, a model without groups).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from moetuner.atomic import atomic_path

TRACE_FORMAT = "moetuner-trace/1"
WEIGHT_DTYPES = {"float16": np.float16, "float32": np.float32, "none": None}  # topk_weights storage choices
REQUIRED_METADATA = (
    "format", "model", "num_experts", "top_k", "moe_layers", "source", "dtype",
    "hidden_size", "moe_intermediate_size",
)
N_GROUP = "n_group"  # optional metadata key: the model's expert-group count (absent: 1)


class TraceError(ValueError):
    """A trace file or trace object is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Trace:
    """Routing of T tokens through L MoE layers with top-k experts each."""

    topk_ids: np.ndarray  # int16 [T, L, k]
    seq_ids: np.ndarray  # int32 [T]
    model: str
    num_experts: int
    moe_layers: list[int]
    source: str
    hidden_size: int
    moe_intermediate_size: int
    dtype: str = "bfloat16"
    topk_weights: np.ndarray | None = None  # float16/float32 [T, L, k]
    extra: dict[str, str] = field(default_factory=dict)  # further string metadata, kept verbatim

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    @property
    def n_group(self) -> int:
        """The model's expert-group count (metadata `n_group`; 1 when absent: a model without groups)."""
        return int(self.extra.get(N_GROUP, "1"))

    @property
    def sequences(self) -> np.ndarray:
        """Distinct sequence ids in order of first appearance. [S]"""
        _, first = np.unique(self.seq_ids, return_index=True)
        return self.seq_ids[np.sort(first)]

    def validate(self, name: str = "trace") -> "Trace":
        """Raise TraceError unless shapes, dtypes and ids are consistent; return self."""
        ids = self.topk_ids
        if ids.ndim != 3:
            raise TraceError(f"{name}: topk_ids must be [T, L, k], got shape {ids.shape}")
        if ids.dtype != np.int16:
            raise TraceError(f"{name}: topk_ids must be int16, got {ids.dtype}")
        if self.seq_ids.shape != (ids.shape[0],):
            raise TraceError(f"{name}: seq_ids shape {self.seq_ids.shape} does not match "
                             f"topk_ids [T={ids.shape[0]}, ...]; there must be one sequence id per token")
        if self.seq_ids.dtype != np.int32:
            raise TraceError(f"{name}: seq_ids must be int32, got {self.seq_ids.dtype}")
        if self.topk_weights is not None:
            if self.topk_weights.shape != ids.shape:
                raise TraceError(f"{name}: topk_weights shape {self.topk_weights.shape} "
                                 f"does not match topk_ids {ids.shape}")
            if self.topk_weights.dtype not in (np.float16, np.float32):
                raise TraceError(f"{name}: topk_weights must be float16 or float32, "
                                 f"got {self.topk_weights.dtype}")
        if self.num_experts <= 0:
            raise TraceError(f"{name}: num_experts must be positive, got {self.num_experts}")
        if len(self.moe_layers) != ids.shape[1]:
            raise TraceError(f"{name}: moe_layers lists {len(self.moe_layers)} layers but "
                             f"topk_ids has L={ids.shape[1]}")
        total = self.extra.get("num_hidden_layers")
        if total is not None and (not str(total).isdigit() or int(total) <= max(self.moe_layers, default=-1)):
            raise TraceError(f"{name}: num_hidden_layers={total!r} must be an integer above the last MoE "
                             f"layer {max(self.moe_layers, default=-1)}")
        group = self.extra.get(N_GROUP, "1")
        if not group.isdigit() or int(group) < 1 or self.num_experts % int(group):
            raise TraceError(f"{name}: metadata n_group={group!r} must be a positive integer dividing "
                             f"num_experts={self.num_experts} (the model config's n_group; 1 without groups)")
        if ids.shape[2] > self.num_experts:
            raise TraceError(f"{name}: top_k={ids.shape[2]} exceeds num_experts={self.num_experts}")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_experts:
                bad = lo if lo < 0 else hi
                raise TraceError(f"{name}: expert id {bad} outside [0, {self.num_experts}); "
                                 f"the trace was recorded for a model with more experts, or "
                                 f"num_experts in its metadata is wrong")
        return self

    def metadata(self) -> dict[str, str]:
        """The header metadata written to the safetensors file."""
        meta = dict(self.extra)
        meta.update({
            "format": TRACE_FORMAT,
            "model": self.model,
            "num_experts": str(self.num_experts),
            "top_k": str(self.top_k),
            "moe_layers": json.dumps([int(x) for x in self.moe_layers]),
            "source": self.source,
            "dtype": self.dtype,
            "hidden_size": str(self.hidden_size),
            "moe_intermediate_size": str(self.moe_intermediate_size),
        })
        return meta

    def with_weights(self, weights: str) -> "Trace":
        """This trace with topk_weights [T, L, k] stored as `weights` (float16 | float32 | none: dropped)."""
        if weights not in WEIGHT_DTYPES:
            raise TraceError(f"weights={weights!r}; choose one of {sorted(WEIGHT_DTYPES)}")
        dtype = WEIGHT_DTYPES[weights]
        if self.topk_weights is None or dtype is None:
            return replace(self, topk_weights=None)
        return replace(self, topk_weights=self.topk_weights.astype(dtype))

    def select_tokens(self, mask: np.ndarray, source_suffix: str = "") -> "Trace":
        """The sub-trace of tokens where `mask` [T] is true."""
        weights = None if self.topk_weights is None else self.topk_weights[mask]
        return replace(self, topk_ids=self.topk_ids[mask], seq_ids=self.seq_ids[mask],
                       topk_weights=weights, source=self.source + source_suffix)

    def select_sequences(self, seqs: np.ndarray, source_suffix: str = "") -> "Trace":
        """The sub-trace of the tokens whose sequence id is in `seqs`."""
        return self.select_tokens(np.isin(self.seq_ids, seqs), source_suffix)


def primary_column(trace_ids: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Column of each token's primary expert in each layer (where expert_to_expert gathers its partial
    results): largest gate weight, else 0 (the first listed). [T, L, k] -> [T, L]"""
    if weights is None:
        return np.zeros(trace_ids.shape[:2], dtype=np.int64)
    return np.argmax(weights, axis=-1)


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Validate `trace` and write it to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    trace.validate(str(path))
    tensors = {"topk_ids": np.ascontiguousarray(trace.topk_ids),
               "seq_ids": np.ascontiguousarray(trace.seq_ids)}
    if trace.topk_weights is not None:
        tensors["topk_weights"] = np.ascontiguousarray(trace.topk_weights)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=trace.metadata())
    return path


def _int_field(meta: dict[str, str], key: str, path: Path) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise TraceError(f"{path}: metadata field {key!r} must be an integer, got {meta[key]!r}") from None


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace; every problem raises TraceError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file; make one with moetuner-extract, "
                         f"moetuner-import or moetuner-synth")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as err:
        raise TraceError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise TraceError(f"{path}: missing metadata field(s) {missing}; a moetuner trace needs "
                         f"{list(REQUIRED_METADATA)}")
    if meta["format"] != TRACE_FORMAT:
        raise TraceError(f"{path}: format is {meta['format']!r}, expected {TRACE_FORMAT!r}")
    for key in ("topk_ids", "seq_ids"):
        if key not in names:
            raise TraceError(f"{path}: missing tensor {key!r}")
    try:
        moe_layers = [int(x) for x in json.loads(meta["moe_layers"])]
    except (ValueError, TypeError):
        raise TraceError(f"{path}: metadata moe_layers must be a JSON list of integers, "
                         f"got {meta['moe_layers']!r}") from None
    top_k = _int_field(meta, "top_k", path)
    trace = Trace(
        topk_ids=tensors["topk_ids"], seq_ids=tensors["seq_ids"], model=meta["model"],
        num_experts=_int_field(meta, "num_experts", path), moe_layers=moe_layers,
        source=meta["source"], hidden_size=_int_field(meta, "hidden_size", path),
        moe_intermediate_size=_int_field(meta, "moe_intermediate_size", path),
        dtype=meta["dtype"], topk_weights=tensors.get("topk_weights"),
        extra={k: v for k, v in meta.items() if k not in REQUIRED_METADATA},
    )
    trace.validate(str(path))
    if trace.topk_ids.ndim == 3 and trace.top_k != top_k:
        raise TraceError(f"{path}: metadata top_k={top_k} but topk_ids has k={trace.top_k}")
    return trace


def split_by_sequence(trace: Trace, holdout_fraction: float, seed: int = 0) -> tuple[Trace, Trace]:
    """Split whole sequences into (profile, held-out) parts; no sequence is in both.

    Sequences are shuffled with `seed`; at least one sequence goes to each side.
    """
    assert 0.0 < holdout_fraction < 1.0, "holdout_fraction must be in (0, 1)"
    seqs = trace.sequences
    if len(seqs) < 2:
        raise TraceError(f"trace from {trace.source!r} has {len(seqs)} sequence(s); "
                         f"a split by sequence needs at least 2")
    order = np.random.default_rng(seed).permutation(seqs)
    n_hold = min(len(seqs) - 1, max(1, round(holdout_fraction * len(seqs))))
    held, prof = order[:n_hold], order[n_hold:]
    return trace.select_sequences(prof, ":profile"), trace.select_sequences(held, ":heldout")
