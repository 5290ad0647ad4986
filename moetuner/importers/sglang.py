"""SGLang `--expert-distribution-recorder-mode per_token` dumps -> Trace.

Written by `_DetailAccumulator.dump` in sglang `python/sglang/srt/eplb/expert_distribution.py`
with `torch.save` as `expert_distribution_recorder_{time}_{rank}.pt`:
  {"records": [one dict per forward pass: forward_pass_id, rank, gatherer_key, input_ids,
               positions, extend_seq_lens (list or None), forward_mode,
               topk_ids_of_layer int32 [num_layers, num_tokens, 8], misc_objects], ...],
   "last_physical_to_logical_map": int [num_layers, num_physical_experts]}
The ids are PHYSICAL slots (after `topk_ids_logical_to_physical`), -1 where nothing was written:
columns past the model's top-k, layers without a router (dense), padded tokens. Its rows are the decoder
layers (dense ones included), so their count is the model's `num_hidden_layers`. The dump names no
model, so model, hidden_size and moe_intermediate_size must be given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moetuner.importers.base import ModelInfo, RoutingImportError, build_trace, check_exists
from moetuner.trace import Trace

DEFAULT_INFO = ModelInfo(model=None, hidden_size=None, moe_intermediate_size=None)


def load_dump(path: Path) -> dict:
    """The dump's dict, checked for the two fields the importer reads."""
    check_exists(path, "an SGLang expert_distribution_recorder_*.pt dump (per_token mode)")
    import torch  # here, so that importing the other formats does not pay for torch

    try:
        dump = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad pickle
        raise RoutingImportError(f"{path}: not a readable torch.save file: {err}") from err
    if not isinstance(dump, dict) or "records" not in dump or "last_physical_to_logical_map" not in dump:
        raise RoutingImportError(f"{path}: no `records` / `last_physical_to_logical_map`; this reader needs "
                                 f"a dump of --expert-distribution-recorder-mode per_token (not stat)")
    if not dump["records"]:
        raise RoutingImportError(f"{path}: the dump holds no forward passes; record while serving requests")
    return dump


def record_sequences(record: dict) -> np.ndarray:
    """Group index [n] of each token of one forward pass: one group per extended (prefill)
    sequence when `extend_seq_lens` covers the pass, else the whole pass is one group (decode
    tokens carry no request id to link them across passes)."""
    num_tokens = np.asarray(record["topk_ids_of_layer"]).shape[1]
    lens = record.get("extend_seq_lens")
    if lens is not None and sum(lens) == num_tokens:
        return np.repeat(np.arange(len(lens)), lens)
    return np.zeros(num_tokens, dtype=np.int64)


def physical_to_logical(ids: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    """Map physical ids [L, T, k] through phy2log [L, P] to logical ids [L, T, k]."""
    return np.take_along_axis(phy2log[:, None, :], ids.reshape(ids.shape[0], 1, -1), axis=2).reshape(ids.shape)


def read_sglang(path: Path, info: ModelInfo) -> Trace:
    """The trace of one per-token dump: MoE layers and top-k inferred from the written ids."""
    dump = load_dump(path)
    records = dump["records"]
    phy2log = np.asarray(dump["last_physical_to_logical_map"], dtype=np.int64)  # [num_layers, P]
    ids = np.concatenate([np.asarray(r["topk_ids_of_layer"], dtype=np.int64) for r in records], axis=1)
    groups = [record_sequences(r) for r in records]
    offsets = np.cumsum([0] + [g.max(initial=-1) + 1 for g in groups[:-1]])
    seq_ids = np.concatenate([g + o for g, o in zip(groups, offsets)])
    written = ids != -1
    layers = np.flatnonzero(written.any(axis=(1, 2)))
    cols = np.flatnonzero(written[layers].any(axis=(0, 1)))
    ids = ids[layers][:, :, cols]  # [L, T, k]
    keep = (ids != -1).all(axis=(0, 2))  # padded tokens have -1 in every layer
    ids, seq_ids = ids[:, keep], seq_ids[keep]
    if phy2log.shape[0] != written.shape[0] or (phy2log < 0).any():
        raise RoutingImportError(f"{path}: last_physical_to_logical_map has shape {phy2log.shape} (or -1 "
                                 f"entries) but topk_ids_of_layer has {written.shape[0]} layers")
    if ids.size and (ids.min() < 0 or ids.max() >= phy2log.shape[1]):
        raise RoutingImportError(f"{path}: physical expert id outside [0, {phy2log.shape[1]}) or a token "
                                 f"routed in some MoE layers only; were fused shared experts recorded? "
                                 f"record with shared-expert fusion disabled")
    logical = physical_to_logical(ids, phy2log[layers])
    return build_trace(info, topk_ids=logical.transpose(1, 0, 2), seq_ids=np.unique(seq_ids, return_inverse=True)[1],
                       num_experts=int(phy2log.max()) + 1, moe_layers=list(layers), source=f"sglang:{path}",
                       extra={"dataset": "sglang", "forward_passes": str(len(records)),
                              "num_hidden_layers": str(phy2log.shape[0])})
