"""A model's decoder layers: how many there are and which are MoE, from a trace or a Hugging Face config.json.

Engines key a placement by layer in three ways (docs/engines.md): SGLang by decoder layer with dense
layers included (`num_hidden_layers` rows), vLLM by MoE-layer ordinal, TensorRT-LLM by the decoder index
of each MoE layer. So an engine file needs the model's layout, not just the placement's L MoE rows.

MoE-layer rules (transformers 5.25 modeling code; vLLM and SGLang apply the same):
- DeepSeek-V2/V3 (`deepseek_v2`, `deepseek_v3`): layer i is MoE when `n_routed_experts` is set,
  i >= `first_k_dense_replace` and i % `moe_layer_freq` == 0;
- Qwen2-MoE / Qwen3-MoE: i not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0;
- Mixtral, OLMoE: every layer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any



class LayoutError(ValueError):
    """A model layout is unknown, malformed or disagrees with a trace; the message names both sides."""


@dataclass(frozen=True)
class ModelLayout:
    """Decoder layers of a model: `moe_layers` (decoder indices, ascending) out of `num_hidden_layers`."""

    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int | None = None
    architecture: str = "unknown"  # config.json `architectures[0]` where known
    n_group: int = 1  # expert groups of the router (DeepSeek-V2/V3 `n_group`, else 1)
    source: str = "unknown"  # where the layout was read: a config.json path or a trace

    def __post_init__(self) -> None:
        layers = tuple(int(i) for i in self.moe_layers)
        object.__setattr__(self, "moe_layers", layers)
        if not layers:
            raise LayoutError(f"{self.source}: no MoE layer among {self.num_hidden_layers} decoder layers")
        if list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.num_hidden_layers:
            raise LayoutError(f"{self.source}: MoE layers {list(layers)} must be distinct ascending decoder "
                              f"indices in [0, {self.num_hidden_layers})")

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if i not in set(self.moe_layers))


def _deepseek(config: Mapping[str, Any]) -> list[int]:
    first, freq = int(config.get("first_k_dense_replace", 0)), int(config.get("moe_layer_freq", 1))
    return [i for i in range(int(config["num_hidden_layers"])) if i >= first and i % freq == 0]


def _qwen_moe(config: Mapping[str, Any]) -> list[int]:
    step, dense = int(config.get("decoder_sparse_step", 1)), set(config.get("mlp_only_layers") or [])
    return [i for i in range(int(config["num_hidden_layers"])) if i not in dense and (i + 1) % step == 0]


def _every_layer(config: Mapping[str, Any]) -> list[int]:
    return list(range(int(config["num_hidden_layers"])))


_EXPERTS = ("num_experts", "num_local_experts")  # Hub config.json files / transformers 5's to_dict()
MOE_LAYER_RULES: dict[str, tuple[Callable[[Mapping[str, Any]], list[int]], tuple[str, ...]]] = {
    "deepseek_v2": (_deepseek, ("n_routed_experts",)),
    "deepseek_v3": (_deepseek, ("n_routed_experts",)),
    "qwen2_moe": (_qwen_moe, _EXPERTS),
    "qwen3_moe": (_qwen_moe, _EXPERTS),
    "mixtral": (_every_layer, ("num_local_experts",)),
    "olmoe": (_every_layer, _EXPERTS),
}
"""model_type -> (its MoE-layer rule, the config keys that may hold its routed-expert count)."""


def layout_from_config_dict(config: Mapping[str, Any], source: str = "config.json") -> ModelLayout:
    """The layout of a config.json's dict; raises LayoutError for an unsupported model_type."""
    model_type = config.get("model_type")
    if model_type not in MOE_LAYER_RULES:
        raise LayoutError(f"{source}: model_type {model_type!r} has no known MoE-layer rule; supported: "
                          f"{sorted(MOE_LAYER_RULES)}")
    if "num_hidden_layers" not in config:
        raise LayoutError(f"{source}: no num_hidden_layers; give the model's full config.json")
    rule, experts_keys = MOE_LAYER_RULES[model_type]
    architectures = config.get("architectures") or [model_type]
    n_group = config.get("n_group") if model_type.startswith("deepseek") else None
    experts = next((config[k] for k in experts_keys if config.get(k) is not None), None)
    return ModelLayout(num_hidden_layers=int(config["num_hidden_layers"]), moe_layers=tuple(rule(config)),
                       num_experts=None if experts is None else int(experts), architecture=str(architectures[0]),
                       n_group=int(n_group or 1), source=source)


def read_model_config(path: str | os.PathLike[str]) -> ModelLayout:
    """The layout (with `n_group`) of a Hugging Face config.json, or of a checkpoint folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise LayoutError(f"{path}: no such file; model_config= takes a Hugging Face config.json "
                          f"(or the checkpoint folder holding it)") from None
    except json.JSONDecodeError as err:
        raise LayoutError(f"{path}: not valid JSON ({err})") from None
    return layout_from_config_dict(config, str(path))


def _listed(value: Any) -> list[int]:
    return [int(x) for x in (json.loads(value) if isinstance(value, str) else value)]


def layout_from_record(record: Mapping[str, Any], source: str) -> ModelLayout | None:
    """The layout a record holds (`num_hidden_layers`, `moe_layers`; optional `num_experts`, `architecture`;
    numbers or the strings of trace metadata), or None where it has no num_hidden_layers or moe_layers."""
    if record.get("num_hidden_layers") is None or record.get("moe_layers") is None:
        return None
    experts = record.get("num_experts")
    return ModelLayout(num_hidden_layers=int(record["num_hidden_layers"]), moe_layers=tuple(_listed(record["moe_layers"])),
                       num_experts=None if experts is None else int(experts),
                       architecture=str(record.get("architecture", "unknown")), source=source)


def check_same_layout(recorded: ModelLayout, config: ModelLayout) -> None:
    """Raise LayoutError naming both unless their MoE layers, layer counts and expert counts agree."""
    facts = lambda x: (x.num_hidden_layers, x.moe_layers)  # noqa: E731
    if facts(recorded) != facts(config) or (None not in (recorded.num_experts, config.num_experts)
                                            and recorded.num_experts != config.num_experts):
        raise LayoutError(
            f"{recorded.source} has {recorded.num_hidden_layers} decoder layers, MoE layers "
            f"{list(recorded.moe_layers)} and {recorded.num_experts} experts, but {config.source} has "
            f"{config.num_hidden_layers}, {list(config.moe_layers)} and {config.num_experts}; use the "
            f"config.json of the model the routing was recorded from")


def check_record(config: ModelLayout, record: Mapping[str, Any], source: str) -> None:
    """Raise LayoutError naming both unless what `record` holds (moe_layers; num_hidden_layers and
    num_experts where present) agrees with `config`; a record without moe_layers has nothing to check."""
    given = {k: v for k, v in record.items() if v is not None}
    recorded = layout_from_record({"num_hidden_layers": config.num_hidden_layers, **given}, source)
    if recorded is not None:
        check_same_layout(recorded, config)


def resolve_layout(record: Mapping[str, Any], config: ModelLayout | None, num_moe_layers: int,
                   source: str) -> ModelLayout:
    """The layout to export with: the config's (checked against `record`, e.g. a placement's extra), else
    the one `record` holds. num_moe_layers: the placement's row count L, which it must have as MoE layers."""
    if config is not None:
        check_record(config, record, source)
    layout = config or layout_from_record(record, source)
    if layout is None:
        raise LayoutError(f"{source}: the model's decoder layers are unknown (no num_hidden_layers recorded); "
                          f"give model_config=PATH/config.json")
    if len(layout.moe_layers) != num_moe_layers:
        raise LayoutError(f"{source} has {num_moe_layers} MoE layers but {layout.source} has "
                          f"{len(layout.moe_layers)} ({list(layout.moe_layers)}); export a placement solved "
                          f"for this model")
    return layout
