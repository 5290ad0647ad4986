"""FLAME-MoE routing traces (.npz, converted from the FLAME-MoE `.pt` dumps) -> Trace.

Two layouts, told apart by the rank of `topk_ids`:
  prefill  topk_ids [L, T, k], tokens of `T // seq_len` sequences of `seq_len` tokens, row-major;
  decode   topk_ids [positions, L, S, k], the first positions of S sequences.
Both carry `topk_scores` (same shape) and `moe_layers` [L]. FLAME-MoE-290M-1.3B has 64 routed
experts; its sizes (hidden 1024, MoE FFN 704) come from a FLAME-MoE training launcher (see
docs/traces.md) and are options, not facts in the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moetuner.importers.base import ModelInfo, RoutingImportError, build_trace, check_exists
from moetuner.trace import Trace

NUM_EXPERTS = 64
DEFAULT_INFO = ModelInfo(model="CMU-FLAME/FLAME-MoE-290M-1.3B", hidden_size=1024, moe_intermediate_size=704,
                         n_group=1)  # no expert groups
REQUIRED_KEYS = ("topk_ids", "topk_scores", "moe_layers")


def prefill_tokens(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, T, k] -> (token-major [T, L, k], sequence ids [T] of consecutive seq_len-token runs)."""
    tokens = ids.transpose(1, 0, 2)
    return tokens, np.arange(tokens.shape[0]) // seq_len


def decode_tokens(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[positions, L, S, k] -> (sequence-major [S * positions, L, k], sequence ids [S * positions])."""
    positions, layers, seqs, k = ids.shape
    tokens = ids.transpose(2, 0, 1, 3).reshape(seqs * positions, layers, k)
    return tokens, np.repeat(np.arange(seqs), positions)


def read_flame(path: Path, info: ModelInfo) -> Trace:
    """The trace of one FLAME .npz file (prefill or decode layout)."""
    check_exists(path, "a FLAME-MoE prefill.npz or decode_first10.npz file")
    with np.load(path) as data:
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise RoutingImportError(f"{path}: missing arrays {missing}; a FLAME trace needs {list(REQUIRED_KEYS)}")
        arrays = {k: data[k] for k in data.files}
    ids, scores = arrays["topk_ids"], arrays["topk_scores"]
    if ids.ndim == 3:
        if "seq_len" not in arrays:
            raise RoutingImportError(f"{path}: a prefill trace [L, T, k] needs `seq_len` to tell its sequences apart")
        (tokens, seq_ids), (weights, _) = (prefill_tokens(a, int(arrays["seq_len"])) for a in (ids, scores))
        layout = "prefill"
    elif ids.ndim == 4:
        (tokens, seq_ids), (weights, _) = (decode_tokens(a) for a in (ids, scores))
        layout = "decode"
    else:
        raise RoutingImportError(f"{path}: topk_ids has shape {ids.shape}; expected prefill [L, T, k] "
                                 f"or decode [positions, L, S, k]")
    return build_trace(info, topk_ids=tokens, seq_ids=seq_ids, num_experts=NUM_EXPERTS,
                       moe_layers=list(arrays["moe_layers"]), source=f"flame:{path}",
                       topk_weights=np.ascontiguousarray(weights, dtype=np.float32),
                       extra={"dataset": f"flame-{layout}"})
