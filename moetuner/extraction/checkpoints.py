"""Loading a checkpoint (local folder or hub id) for extraction: dtype, device, supported check."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from moetuner.extraction.capture import check_supported
from moetuner.extraction.extract import ExtractionError
from moetuner.extraction.registry import PRESET_DIR


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

    device `auto`: the GPUs when one exists (`device_map="auto"` if `accelerate` is installed, else
    the whole model on cuda:0), else CPU; or a device name such as `cpu` or `cuda:1`.
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
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if target != "cpu" and importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                     device_map="auto" if device == "auto" else target)
    else:  # a device_map needs `accelerate`; without it, load on CPU and move the whole model
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(target)
    return model.eval(), AutoTokenizer.from_pretrained(path)
