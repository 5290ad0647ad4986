"""What every importer shares: the error type and the model metadata a source may lack."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from moetuner.trace import N_GROUP, Trace


class RoutingImportError(ValueError):
    """A routing source cannot be imported; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelInfo:
    """Model metadata a trace carries that the routing source may not hold."""

    model: str | None
    hidden_size: int | None
    moe_intermediate_size: int | None
    dtype: str = "bfloat16"
    n_group: int | None = None  # the model's expert groups (config n_group); optional: None writes none (1)

    def with_overrides(self, **overrides: object) -> "ModelInfo":
        """This info with every non-None override applied (unknown keys are an error)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        assert not unknown, f"unknown model fields {unknown}; known: {sorted(known)}"
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def require(self, fmt: str) -> "ModelInfo":
        """Raise unless every required field is known (an SGLang dump does not name its model)."""
        missing = [f.name for f in fields(self) if getattr(self, f.name) is None and f.name != "n_group"]
        if missing:
            raise RoutingImportError(f"format {fmt!r} does not record {missing}; give them, e.g. "
                                     + " ".join(f"{m}=..." for m in missing))
        return self


def check_exists(path: Path, what: str) -> Path:
    """`path` if it exists, else a RoutingImportError saying what was expected there."""
    if not path.exists():
        raise RoutingImportError(f"{path}: not found; expected {what}")
    return path


def build_trace(info: ModelInfo, *, topk_ids: np.ndarray, seq_ids: np.ndarray, num_experts: int,
                moe_layers: list[int], source: str, topk_weights: np.ndarray | None = None,
                extra: dict[str, str] | None = None) -> Trace:
    """A Trace of int16 ids [T, L, k] and int32 sequence ids [T], with `info`'s model metadata."""
    groups = {} if info.n_group is None else {N_GROUP: str(int(info.n_group))}
    return Trace(topk_ids=topk_ids.astype(np.int16), seq_ids=seq_ids.astype(np.int32), model=info.model,
                 num_experts=num_experts, moe_layers=[int(x) for x in moe_layers], source=source,
                 hidden_size=info.hidden_size, moe_intermediate_size=info.moe_intermediate_size,
                 dtype=info.dtype, topk_weights=topk_weights, extra={**groups, **(extra or {})})
