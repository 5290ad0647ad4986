"""Preset names -> sources: `conf/presets/model/<name>.yaml` and `conf/presets/dataset/<name>.yaml`.

A model preset holds `preset: <tiny preset>` (built offline by `build_preset`) or
`path: <local folder or hub id>`; a dataset preset holds `source`, and optionally `split`,
`text_field`, `config_name`. A name without a preset file is used as a path or hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.extraction.presets import DEFAULT_CACHE, build_preset

PRESET_DIR = PROJECT_ROOT / "conf" / "presets"
DATASET_DEFAULTS = {"split": "train", "text_field": "text", "config_name": None}


def preset_entry(kind: str, name: str) -> dict[str, Any] | None:
    """The contents of conf/presets/<kind>/<name>.yaml, or None when there is no such preset."""
    path = PRESET_DIR / kind / f"{name}.yaml"
    return dict(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else None


def resolve_model(name: str, cache_dir: str | Path | None = None) -> str:
    """A local folder or hub id for `name` (a tiny preset is built into `cache_dir` first)."""
    entry = preset_entry("model", name)
    if entry is None:
        return name
    if "preset" in entry:
        return str(build_preset(entry["preset"], Path(cache_dir or DEFAULT_CACHE) / entry["preset"]))
    return str(entry["path"])


def resolve_dataset(name: str, **overrides: Any) -> dict[str, Any]:
    """{source, split, text_field, config_name} for `name`; non-None `overrides` win over the preset."""
    entry = preset_entry("dataset", name) or {"source": name}
    given = {k: v for k, v in overrides.items() if v is not None}
    return {**DATASET_DEFAULTS, **entry, **given}
