"""Importers of real routing recorded elsewhere, each into a `moetuner.trace.Trace`.

`import_routing(fmt, path, **overrides)` dispatches on the format name (esft, flame, sglang).
Model metadata a source file does not hold comes from the format's `ModelInfo` defaults, and any
field can be overridden (e.g. the model an SGLang dump came from).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from moetuner.importers import esft, flame, sglang
from moetuner.importers.base import ModelInfo, RoutingImportError
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
        raise RoutingImportError(f"unknown format {fmt!r}; choose one of {list(READERS)}")
    read, default = READERS[fmt]
    info = default.with_overrides(**overrides).require(fmt)
    return read(Path(path), info).validate(str(path))
