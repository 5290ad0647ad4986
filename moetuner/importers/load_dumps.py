"""Engine load dumps -> a load profile (`moetuner.load_profile`): counts per step, MoE layer and logical expert.

Formats (docs/engines.md, "Load dumps", with the engines' source lines):
- `sglang_stat`: SGLang `--expert-distribution-recorder-mode stat`, `torch.save` of {"rank", "logical_count"
  int [N, num_hidden_layers, E] (already logical, summed over ranks; unfilled buffer rows are 0),
  "average_utilization_rate_over_window"}; a step per non-zero buffer row (in buffer, not time, order).
- `sglang_per_pass`: mode `per_pass`, one file per rank: {"records": [{"forward_pass_id", "rank",
  "gatherer_key", "global_physical_count" int [num_hidden_layers, P]}, ...], "last_physical_to_logical_map"
  [num_hidden_layers, P]}; path is one file or a folder of them; a step per forward pass, its counts summed
  over the ranks' records and mapped to experts through the dump's map.
- `vllm_load_stats`: vLLM PR #41141's JSONL, one `eplb_load_stats` record per step: "model", "step",
  "num_layers" (MoE layers), "expert_load" [L][P] and "p2l_map" [L][P] (the map the loads were counted under);
  keyed by MoE-layer ordinal, so the decoder layers come from `model_config`.
- `trtllm_statistic`: TensorRT-LLM `EXPERT_STATISTIC_PATH` folder: meta_info.json ("num_experts",
  "num_experts_per_token") and rank{r}.safetensors with int64 bincounts under "{iter}_{decoder_layer}"; a step
  per iteration, summed over ranks. With its load balancer active the counts are per slot, mapped to experts
  through the balancer's `initial_global_assignments` (`load_balancer=` its YAML).
- `trace`: a moetuner trace's loads per step of `step_tokens` tokens, as an engine would count them while
  serving the trace's requests (the study's `loads` trace kind).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moetuner.importers.base import RoutingImportError, check_exists
from moetuner.load_profile import LoadProfile, load_profile_of_trace
from moetuner.model_layout import ModelLayout, check_record
from moetuner.trace import N_GROUP, load_trace


@dataclass(frozen=True)
class DumpOptions:
    """What a dump may not record: the model name, its layout (config.json) and TRT's slot map."""

    model: str | None = None
    layout: ModelLayout | None = None
    load_balancer: Path | None = None  # TensorRT-LLM load-balancer YAML the dump was counted under
    step_tokens: int = 4096  # format `trace`: tokens per step


def slots_to_experts(physical: np.ndarray, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Counts per physical slot through a map to counts per logical expert. [..., L, P], [L, P] -> [..., L, E]"""
    assert physical.shape[-2:] == phy2log.shape, f"counts {physical.shape} do not match the map {phy2log.shape}"
    onehot = phy2log[..., None] == np.arange(num_experts)  # [L, P, E]
    return np.einsum("...lp,lpe->...le", physical.astype(np.int64), onehot.astype(np.int64))


def _torch_load(path: Path) -> Any:
    import torch  # here, so that importing the other formats does not pay for torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad pickle
        raise RoutingImportError(f"{path}: not a readable torch.save file: {err}") from err


def _array(value: Any) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.int64)


def moe_rows(counts: np.ndarray, options: DumpOptions, path: Path) -> tuple[list[int], int]:
    """(MoE decoder layers, num_hidden_layers) of counts [N, num_hidden_layers, E] indexed by decoder layer:
    the config's where given (checked), else the layers with any count (dense layers count nothing)."""
    total = counts.shape[1]
    used = [int(i) for i in np.flatnonzero(counts.any(axis=(0, 2)))]
    layout = options.layout
    if layout is None:
        return used, total
    if layout.num_experts not in (None, counts.shape[2]):
        raise RoutingImportError(f"{path}: the dump counts {counts.shape[2]} experts but {layout.source} has "
                                 f"{layout.num_experts}; give the config.json of the model that was served")
    if layout.num_hidden_layers != total or not set(used) <= set(layout.moe_layers):
        raise RoutingImportError(f"{path}: the dump has {total} decoder layers with counts in {used}, but "
                                 f"{layout.source} has {layout.num_hidden_layers} with MoE layers "
                                 f"{list(layout.moe_layers)}; give the config.json of the model that was served")
    return list(layout.moe_layers), total


def profile_of(counts: np.ndarray, layers: list[int], total: int | None, fmt: str, path: Path,
               options: DumpOptions, model: str | None = None, **extra: str) -> LoadProfile:
    """A validated LoadProfile of counts [N, L, E] over MoE decoder layers `layers`."""
    name = options.model or model
    if name is None:
        raise RoutingImportError(f"format {fmt!r} does not record the model; give model=NAME")
    meta = {"dump_format": fmt, **extra}
    if total is not None:
        meta["num_hidden_layers"] = str(total)
    if options.layout is not None:
        meta[N_GROUP] = str(options.layout.n_group)  # the model config's expert groups (solver=eplb reads them)
    return LoadProfile(counts=counts.astype(np.int64), model=name, moe_layers=layers, source=f"{fmt}:{path}",
                       extra=meta).validate(str(path))


def read_sglang_stat(path: Path, options: DumpOptions) -> LoadProfile:
    check_exists(path, "an SGLang expert_distribution_recorder_*.pt dump (stat mode)")
    dump = _torch_load(path)
    if not isinstance(dump, dict) or "logical_count" not in dump:
        raise RoutingImportError(f"{path}: no `logical_count`; this reader needs a dump of "
                                 f"--expert-distribution-recorder-mode stat (per_pass: format=sglang_per_pass)")
    counts = _array(dump["logical_count"])
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3:
        raise RoutingImportError(f"{path}: logical_count must be [N, layers, experts], got {counts.shape}")
    counts = counts[counts.any(axis=(1, 2))]  # unfilled rows of the circular buffer are all zero
    layers, total = moe_rows(counts, options, path)
    return profile_of(counts[:, layers], layers, total, "sglang_stat", path, options)


def _per_pass_files(path: Path) -> list[Path]:
    check_exists(path, "an SGLang per_pass dump (.pt) or a folder of one per rank")
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not files:
        raise RoutingImportError(f"{path}: no .pt files; point path= at the dump folder or one rank's file")
    return files


def read_sglang_per_pass(path: Path, options: DumpOptions) -> LoadProfile:
    maps, passes = [], defaultdict(list)
    for file in _per_pass_files(path):
        dump = _torch_load(file)
        if not isinstance(dump, dict) or "records" not in dump or "last_physical_to_logical_map" not in dump:
            raise RoutingImportError(f"{file}: no `records` / `last_physical_to_logical_map`; this reader needs "
                                     f"--expert-distribution-recorder-mode per_pass dumps")
        maps.append(_array(dump["last_physical_to_logical_map"]))
        for record in dump["records"]:
            if "global_physical_count" not in record:
                raise RoutingImportError(f"{file}: a record has no global_physical_count; per_token dumps are "
                                         f"read by format=sglang")
            passes[int(record["forward_pass_id"])].append(_array(record["global_physical_count"]))
    if any(not np.array_equal(m, maps[0]) for m in maps):
        raise RoutingImportError(f"{path}: the ranks' last_physical_to_logical_map differ; the map changed "
                                 f"while recording (EPLB on?); record with a fixed placement")
    if not passes:
        raise RoutingImportError(f"{path}: the dump holds no forward passes; record while serving requests")
    phy2log = maps[0]
    num_experts = options.layout.num_experts if options.layout and options.layout.num_experts else int(phy2log.max()) + 1
    physical = np.stack([np.sum(passes[i], axis=0) for i in sorted(passes)])  # [N, layers, P]
    if physical.shape[1:] != phy2log.shape:
        raise RoutingImportError(f"{path}: counts {physical.shape[1:]} do not match the map {phy2log.shape}")
    counts = slots_to_experts(physical, phy2log, num_experts)
    layers, total = moe_rows(counts, options, path)
    return profile_of(counts[:, layers], layers, total, "sglang_per_pass", path, options,
                      forward_passes=str(len(passes)))


def read_vllm_load_stats(path: Path, options: DumpOptions) -> LoadProfile:
    check_exists(path, "a vLLM expert_load_stats_path JSONL file")
    if options.layout is None:
        raise RoutingImportError(f"{path}: vLLM keys loads by MoE-layer ordinal; give model_config=PATH/config.json "
                                 f"so the MoE layers' decoder indices are known")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            doc = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as err:
            raise RoutingImportError(f"{path}:{number}: not JSON ({err})") from None
        if isinstance(doc, dict) and doc.get("record_type") == "eplb_load_stats":
            records.append(doc)
    models = sorted({str(r.get("model")) for r in records})
    if options.model is not None:
        records = [r for r in records if r.get("model") == options.model]
    elif len(models) > 1:
        raise RoutingImportError(f"{path}: records of several models {models}; pick one with model=NAME")
    if not records:
        raise RoutingImportError(f"{path}: no eplb_load_stats record{'' if options.model is None else ' of ' + options.model}"
                                 f" (models present: {models})")
    layout = options.layout
    num_experts = layout.num_experts or max(int(np.max(r["p2l_map"])) for r in records) + 1
    counts = []
    for r in records:
        load, p2l = _array(r["expert_load"]), _array(r["p2l_map"])
        if load.shape != p2l.shape or load.shape[0] != len(layout.moe_layers):
            raise RoutingImportError(f"{path}: step {r.get('step')}: expert_load {load.shape} and p2l_map {p2l.shape} "
                                     f"must both be [{len(layout.moe_layers)} MoE layers of {layout.source}, slots]")
        counts.append(slots_to_experts(load, p2l, num_experts))
    return profile_of(np.stack(counts), list(layout.moe_layers), layout.num_hidden_layers, "vllm_load_stats", path,
                      options, model=str(records[0].get("model")), steps=json.dumps([r.get("step") for r in records]))


_TRT_KEY = re.compile(r"(\d+)_(\d+)")


def trtllm_slot_map(path: Path, layers: list[int]) -> np.ndarray:
    """[L, P] slot -> expert of a TensorRT-LLM load-balancer YAML (or an options YAML holding one)."""
    doc = yaml.safe_load(check_exists(path, "the TensorRT-LLM load-balancer YAML the dump was counted under").read_text())
    doc = doc.get("moe_config", {}).get("load_balancer", doc) if isinstance(doc, dict) else doc
    if isinstance(doc, str):  # an options file naming the balancer file
        return trtllm_slot_map(Path(doc), layers)
    rows = (doc or {}).get("initial_global_assignments") if isinstance(doc, dict) else None
    if not isinstance(rows, dict) or not set(layers) <= set(rows):
        raise RoutingImportError(f"{path}: initial_global_assignments must hold every dumped layer {layers}")
    return np.asarray([rows[layer] for layer in layers], dtype=np.int64)


def read_trtllm_statistic(path: Path, options: DumpOptions) -> LoadProfile:
    from safetensors.numpy import load_file

    check_exists(path, "a TensorRT-LLM EXPERT_STATISTIC_PATH folder")
    meta = json.loads(check_exists(path / "meta_info.json", "meta_info.json (written by rank 0)").read_text())
    counts: dict[tuple[int, int], np.ndarray] = {}
    files = sorted(path.glob("rank*.safetensors"))
    if not files:
        raise RoutingImportError(f"{path}: no rank*.safetensors files")
    for file in files:
        for key, value in load_file(str(file)).items():
            match = _TRT_KEY.fullmatch(key)
            if match is None:
                raise RoutingImportError(f"{file}: key {key!r} is not '<iteration>_<decoder layer>'")
            index = (int(match.group(1)), int(match.group(2)))
            counts[index] = counts.get(index, 0) + value.astype(np.int64)
    iterations = sorted({i for i, _ in counts})
    layers = sorted({layer for _, layer in counts})
    if any((i, layer) not in counts for i in iterations for layer in layers):
        raise RoutingImportError(f"{path}: not every iteration has every layer")
    slots = np.stack([np.stack([counts[i, layer] for layer in layers]) for i in iterations])  # [N, L, width]
    width = int(meta["num_experts"])
    layout = options.layout
    if options.load_balancer is not None:
        phy2log = trtllm_slot_map(options.load_balancer, layers)
        experts = layout.num_experts if layout and layout.num_experts else int(phy2log.max()) + 1
        logical = slots_to_experts(slots, phy2log, experts)
    elif layout is not None and layout.num_experts not in (None, width):
        raise RoutingImportError(f"{path}: counts over {width} slots but {layout.source} has {layout.num_experts} "
                                 f"experts: the load balancer was on; give load_balancer=ITS.yaml to map slots back")
    else:
        logical = slots
    if layout is not None and not set(layers) <= set(layout.moe_layers):
        raise RoutingImportError(f"{path}: dumped layers {layers} are not MoE layers of {layout.source} "
                                 f"({list(layout.moe_layers)})")
    return profile_of(logical, layers, None if layout is None else layout.num_hidden_layers, "trtllm_statistic", path,
                      options, iterations=json.dumps(iterations))


def read_trace_loads(path: Path, options: DumpOptions) -> LoadProfile:
    """A moetuner trace's loads per step (what an engine would have dumped serving its requests)."""
    trace = load_trace(path)
    if options.layout is not None:
        check_record(options.layout, {**trace.extra, "moe_layers": trace.moe_layers, "num_experts": trace.num_experts},
                     f"trace {path}")
    return load_profile_of_trace(trace, options.step_tokens).validate(str(path))


LOAD_READERS: dict[str, Callable[[Path, DumpOptions], LoadProfile]] = {
    "sglang_stat": read_sglang_stat,
    "sglang_per_pass": read_sglang_per_pass,
    "vllm_load_stats": read_vllm_load_stats,
    "trtllm_statistic": read_trtllm_statistic,
    "trace": read_trace_loads,
}
