"""Importers of real routing recorded elsewhere, each into a `moetuner.trace.Trace`.

`import_routing(fmt, path, **overrides)` dispatches on the format name (esft, flame, sglang).
Model metadata a source file does not hold comes from the format's `ModelInfo` defaults, and any
field can be overridden (e.g. the model an SGLang dump came from).
`import_loads(fmt, path, ...)` reads an engine's load dump (sglang_stat, sglang_per_pass,
vllm_load_stats, trtllm_statistic; `trace`: a moetuner trace's loads) into a load profile
(`moetuner.importers.load_dumps`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from moetuner.importers import esft, flame, sglang
from moetuner.importers.base import ModelInfo, RoutingImportError
from moetuner.importers.load_dumps import LOAD_READERS, DumpOptions
from moetuner.load_profile import LoadProfile
from moetuner.model_layout import read_model_config
from moetuner.trace import Trace

Reader = Callable[[Path, ModelInfo], Trace]
READERS: dict[str, tuple[Reader, ModelInfo]] = {
    "esft": (esft.read_esft, esft.DEFAULT_INFO),
    "flame": (flame.read_flame, flame.DEFAULT_INFO),
    "sglang": (sglang.read_sglang, sglang.DEFAULT_INFO),
}


def import_routing(fmt: str, path: str | os.PathLike[str], **overrides: object) -> Trace:
    """Read routing in format `fmt` from `path` as a validated Trace; overrides fill ModelInfo."""
    if fmt not in READERS:
        raise RoutingImportError(f"unknown format {fmt!r}; choose one of {list(READERS) + list(LOAD_READERS)}")
    read, default = READERS[fmt]
    info = default.with_overrides(**overrides).require(fmt)
    return read(Path(path), info).validate(str(path))


def import_loads(fmt: str, path: str | os.PathLike[str], model: str | None = None,
                 model_config: str | os.PathLike[str] | None = None,
                 load_balancer: str | os.PathLike[str] | None = None, step_tokens: int = 4096) -> LoadProfile:
    """Read an engine load dump in format `fmt` from `path` as a validated LoadProfile.

    model: the model's name where the dump does not record it; model_config: its Hugging Face config.json
    (the decoder layers and expert count; vllm_load_stats needs it); load_balancer: the TensorRT-LLM
    balancer YAML a trtllm_statistic dump was counted under (its counts are then per slot); step_tokens:
    tokens per step of format `trace`.
    """
    if fmt not in LOAD_READERS:
        raise RoutingImportError(f"unknown load-dump format {fmt!r}; choose one of {list(LOAD_READERS)}")
    layout = None if model_config is None else read_model_config(model_config)
    options = DumpOptions(model=model, layout=layout, load_balancer=None if load_balancer is None else Path(load_balancer),
                          step_tokens=int(step_tokens))
    return LOAD_READERS[fmt](Path(path), options)
