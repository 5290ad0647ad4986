"""The extraction loop: batches by token budget, router capture, shards on disk, resume, merge.

Each batch's routing is written as its own small trace `<out>.shards/shard_<batch>.safetensors`
(atomically), so memory stays bounded and a re-run after a kill skips every batch whose shard
exists and matches; at the end the shards are merged into `<out>` (atomically) and removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moetuner.extraction.capture import RouterCapture, model_shape
from moetuner.trace import N_GROUP, WEIGHT_DTYPES, Trace, TraceError, load_trace, save_trace


class ExtractionError(ValueError):
    """Extraction cannot run: bad options, a missing checkpoint, or no text."""


@dataclass(frozen=True)
class ExtractSpec:
    """How to cut text into batches and what to store."""

    seq_len: int = 512  # tokens per sequence; longer documents are truncated
    token_budget: int = 8192  # padded tokens (batch size * longest sequence) per forward pass
    max_tokens: int | None = None  # stop once this many tokens are planned (whole sequences)
    max_sequences: int | None = None
    weights: str = "float16"  # topk_weights dtype: float16 | float32 | none

    def check(self) -> "ExtractSpec":
        if self.seq_len < 1 or self.token_budget < 1:
            raise ExtractionError(f"seq_len={self.seq_len} and token_budget={self.token_budget} must be >= 1")
        if self.weights not in WEIGHT_DTYPES:
            raise ExtractionError(f"weights={self.weights!r}; choose one of {sorted(WEIGHT_DTYPES)}")
        return self


@dataclass(frozen=True)
class Batch:
    """Sequences for one forward pass: their sequence ids and token ids (unpadded)."""

    index: int
    seq_ids: list[int]
    input_ids: list[list[int]]

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.input_ids))


def plan_batches(docs: Iterable[tuple[int, str]], tokenize: Callable[[str], list[int]],
                 spec: ExtractSpec) -> Iterator[Batch]:
    """Greedy batches in source order: add sequences while batch size * longest <= token_budget."""
    seq_ids: list[int] = []
    ids: list[list[int]] = []
    index = tokens_seen = seqs_seen = 0
    for seq_id, text in docs:
        tokens = tokenize(text)[:spec.seq_len]
        if not tokens:
            continue
        if ids and (len(ids) + 1) * max(len(tokens), *map(len, ids)) > spec.token_budget:
            yield Batch(index, seq_ids, ids)
            index, seq_ids, ids = index + 1, [], []
        seq_ids.append(seq_id)
        ids.append(tokens)
        tokens_seen += len(tokens)
        seqs_seen += 1
        if (spec.max_tokens is not None and tokens_seen >= spec.max_tokens) or \
                (spec.max_sequences is not None and seqs_seen >= spec.max_sequences):
            break
    if ids:
        yield Batch(index, seq_ids, ids)


def collate(batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids [B, S], attention_mask [B, S])."""
    width = max(map(len, batch.input_ids))
    input_ids = torch.full((len(batch.input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, tokens in enumerate(batch.input_ids):
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return input_ids, mask


def empty_trace(model: torch.nn.Module, name: str, source: str) -> Trace:
    """A trace with the model's metadata and no tokens: the template every shard is filled into."""
    shape = model_shape(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return Trace(topk_ids=np.zeros((0, len(shape["moe_layers"]), shape["top_k"]), np.int16),
                 seq_ids=np.zeros(0, np.int32), model=name, num_experts=shape["num_experts"],
                 moe_layers=shape["moe_layers"], source=source, hidden_size=shape["hidden_size"],
                 moe_intermediate_size=shape["moe_intermediate_size"], dtype=dtype,
                 extra={"num_hidden_layers": str(shape["num_hidden_layers"]), N_GROUP: str(shape["n_group"])})


@torch.no_grad()
def route_batch(model: torch.nn.Module, capture: RouterCapture, batch: Batch, pad_id: int,
                template: Trace, weights: str) -> Trace:
    """One forward pass; the trace of `batch`'s real tokens (padding dropped)."""
    input_ids, mask = collate(batch, pad_id)
    device = next(model.parameters()).device
    model.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)  # no lm_head
    ids, gate_weights = capture.pop(mask)
    seq_ids = np.repeat(np.asarray(batch.seq_ids, np.int32), [len(t) for t in batch.input_ids])
    dtype = WEIGHT_DTYPES[weights]
    return replace(template, topk_ids=ids, seq_ids=seq_ids,
                   topk_weights=None if dtype is None else gate_weights.astype(dtype))


def fingerprint(template: Trace, spec: ExtractSpec) -> str:
    """Identifies a run's settings; shards from other settings are never reused."""
    key = json.dumps({"meta": template.metadata(), "spec": asdict(spec)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def shard_path(shards: Path, index: int) -> Path:
    return shards / f"shard_{index:05d}.safetensors"


def load_shard(path: Path, batch: Batch, key: str) -> Trace | None:
    """The shard at `path` if it exists, is readable, and holds exactly `batch` from this run."""
    if not path.is_file():
        return None
    try:
        shard = load_trace(path)
    except TraceError:
        return None
    complete = (shard.extra.get("fingerprint") == key and shard.num_tokens == batch.num_tokens
                and shard.sequences.tolist() == batch.seq_ids)
    return shard if complete else None


def write_shard(shard: Trace, path: Path, key: str) -> Trace:
    """Save one batch's trace atomically, tagged with the run fingerprint."""
    shard = replace(shard, extra={**shard.extra, "fingerprint": key})
    save_trace(shard, path)
    return shard


def merge(template: Trace, shards: list[Trace]) -> Trace:
    """Concatenate shard traces in batch order into `template` (its metadata). [sum T, L, k]"""
    weights = None if shards[0].topk_weights is None else np.concatenate([s.topk_weights for s in shards])
    return replace(template, topk_ids=np.concatenate([s.topk_ids for s in shards]),
                   seq_ids=np.concatenate([s.seq_ids for s in shards]), topk_weights=weights)


@dataclass(frozen=True)
class ExtractResult:
    """The merged trace and the run's metrics (tokens, sequences, layers, batches, tokens_per_s)."""

    trace: Trace
    metrics: dict[str, float]


def extract_trace(model: torch.nn.Module, tokenize: Callable[[str], list[int]], pad_id: int,
                  docs: Iterable[tuple[int, str]], out: str | Path, spec: ExtractSpec,
                  model_name: str, source: str) -> ExtractResult:
    """Route `docs` through `model`, save the trace to `out` (resuming from `<out>.shards/`).

    Only ids go to disk batch by batch; the shards are read back for the final merge.
    """
    spec.check()
    out = Path(out)
    shards_dir = out.parent / f"{out.name}.shards"
    template = empty_trace(model, model_name, source)
    key = fingerprint(template, spec)
    batches = resumed = 0
    forward_s = forward_tokens = 0.0
    with RouterCapture(model) as capture, tqdm(total=spec.max_tokens, unit="tok", desc="extract") as bar:
        for batch in plan_batches(docs, tokenize, spec):
            path = shard_path(shards_dir, batch.index)
            shard = load_shard(path, batch, key)
            if shard is None:
                start = time.perf_counter()
                shard = write_shard(route_batch(model, capture, batch, pad_id, template, spec.weights), path, key)
                forward_s += time.perf_counter() - start
                forward_tokens += batch.num_tokens
            else:
                resumed += 1
            batches += 1
            bar.update(batch.num_tokens)
    if not batches:
        raise ExtractionError(f"no text to route from {source!r}: the source has no non-empty document")
    trace = merge(template, [load_trace(shard_path(shards_dir, i)) for i in range(batches)])
    save_trace(trace, out)
    shutil.rmtree(shards_dir, ignore_errors=True)
    metrics = {"tokens": trace.num_tokens, "sequences": len(trace.sequences), "layers": trace.num_layers,
               "batches": batches, "resumed_batches": resumed,
               "tokens_per_s": forward_tokens / forward_s if forward_s else 0.0}
    return ExtractResult(trace, metrics)
