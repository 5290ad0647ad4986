"""DeepSeek ESFT expert-score folders (`get_expert_scores.py` output) -> Trace.

A folder holds `expert_weights_{l}.txt` for each MoE decoder layer l. Line i of every file is
sequence i: its token-major expert ids (top_k per token), tab-separated, an empty field, then the
matching gate weights. The ESFT models are DeepSeek-V2-Lite: 64 routed experts, top-6, 27 decoder layers
(layer 0 dense, 1..26 MoE), recorded as `num_hidden_layers`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moetuner.importers.base import ModelInfo, RoutingImportError, build_trace, check_exists
from moetuner.trace import Trace

NUM_EXPERTS = 64
TOP_K = 6
NUM_HIDDEN_LAYERS = 27  # DeepSeek-V2-Lite config.json
# DeepSeek-V2-Lite's config.json: n_group 1 (no expert groups)
DEFAULT_INFO = ModelInfo(model="deepseek-ai/DeepSeek-V2-Lite", hidden_size=2048, moe_intermediate_size=1408, n_group=1)
_LAYER_FILE = re.compile(r"expert_weights_(\d+)\.txt")


def layer_files(folder: Path) -> dict[int, Path]:
    """{decoder layer index: file} for the `expert_weights_{l}.txt` files in `folder`, sorted by l."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _LAYER_FILE.fullmatch(p.name))}
    if not found:
        raise RoutingImportError(f"{folder}: no expert_weights_{{l}}.txt files; point path= at one "
                                 f"ESFT task folder, e.g. .../esft-deepseek-v2-lite/intent")
    return dict(sorted(found.items()))


def parse_line(line: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One sequence of one layer: (ids int16 [n, TOP_K], weights float32 [n, TOP_K])."""
    parts = line.rstrip("\n").split("\t\t")
    if len(parts) != 2:
        raise RoutingImportError(f"{where}: expected ids, an empty field, then weights "
                                 f"(one '\\t\\t' separator), found {len(parts) - 1}")
    ids = np.array(parts[0].split("\t"), dtype=np.int64)
    weights = np.array(parts[1].split("\t"), dtype=np.float32)
    if ids.size != weights.size or ids.size % TOP_K:
        raise RoutingImportError(f"{where}: {ids.size} ids and {weights.size} weights; both must be "
                                 f"the same multiple of top_k={TOP_K}")
    return ids.astype(np.int16).reshape(-1, TOP_K), weights.reshape(-1, TOP_K)


def read_layer(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every sequence of one layer file, in line order."""
    with path.open() as f:
        return [parse_line(line, f"{path}:{i + 1}") for i, line in enumerate(f)]


def read_esft(folder: Path, info: ModelInfo) -> Trace:
    """The trace of one ESFT task folder: sequences in line order, layers in file order."""
    check_exists(folder, "an ESFT task folder of expert_weights_{l}.txt files")
    files = layer_files(folder)
    layers = [read_layer(p) for p in tqdm(files.values(), desc=f"esft {folder.name}", unit="layer")]
    lengths = [len(seq_ids) for seq_ids, _ in layers[0]]
    for (layer, path), seqs in zip(files.items(), layers):
        if [len(s) for s, _ in seqs] != lengths:
            raise RoutingImportError(f"{path}: sequence lengths differ from layer {next(iter(files))}; "
                                     f"every layer file must hold the same sequences in the same order")
    ids = np.stack([np.concatenate([s for s, _ in seqs]) for seqs in layers], axis=1)  # [T, L, k]
    weights = np.stack([np.concatenate([w for _, w in seqs]) for seqs in layers], axis=1)
    seq_ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return build_trace(info, topk_ids=ids, seq_ids=seq_ids, num_experts=NUM_EXPERTS,
                       moe_layers=list(files), source=f"esft:{folder}", topk_weights=weights,
                       extra={"dataset": folder.name, "num_hidden_layers": str(NUM_HIDDEN_LAYERS)})
