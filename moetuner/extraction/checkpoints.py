"""Name -> checkpoint: preset files in conf/presets/model/, local folders, hub ids; loading them.

`conf/presets/model/<name>.yaml` holds either `preset: <tiny preset>` (built offline by
`build_preset`) or `path: <local folder or hub id>`; any other name is used as a path or hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.extraction.capture import check_supported
from moetuner.extraction.extract import ExtractionError
from moetuner.extraction.presets import DEFAULT_CACHE, build_preset

PRESET_DIR = PROJECT_ROOT / "conf" / "presets"


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


def torch_dtype(dtype: str) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on CPU; otherwise a torch dtype name."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ExtractionError(f"dtype={dtype!r} is not a torch dtype; use auto, bfloat16, float16 or float32")
    return getattr(torch, dtype)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).exists()


def load_model(path: str, dtype: str = "auto", device: str = "auto") -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from a local folder or hub id; unsupported families fail fast.

    device `auto`: `device_map="auto"` when a GPU exists, else CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise ExtractionError(f"model checkpoint folder {path} does not exist; give a folder with "
                              f"config.json, a hub id, or a preset from {PRESET_DIR / 'model'}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ExtractionError(f"cannot read a model config from {path!r} ({err}); offline machines need "
                              f"a local folder or a preset from {PRESET_DIR / 'model'}") from err
    check_supported(config)
    device_map = ("auto" if torch.cuda.is_available() else None) if device == "auto" else device
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), device_map=device_map)
    return model.eval(), AutoTokenizer.from_pretrained(path)
