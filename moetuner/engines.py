"""Engine files and launch flags of a placement: SGLang, vLLM (PR #41141) and TensorRT-LLM (docs/engines.md).

The three engines key a placement's rows three ways (`moetuner.model_layout`):
- SGLang `--init-expert-location` file: `{"physical_to_logical_map": [num_hidden_layers][P]}`, one row per
  decoder layer, dense rows unused (written trivial, `[i % E for i in range(P)]`);
- vLLM `initial_mapping_path` JSONL record `eplb_initial_mapping`, keyed by MoE-layer ordinal "0".."L-1";
- TensorRT-LLM `moe_config.load_balancer` YAML, keyed by the decoder index of each MoE layer.
None of the engines checks everything (SGLang checks almost nothing), so `check_exportable` validates a
map before anything is written, and `read_engine_file` decodes a written file back under the strictest
reading (extra keys, missing or shifted layers, uncovered experts and ids out of range are refused).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moetuner.atomic import write_atomic, write_json_atomic
from moetuner.costmodel.settings import check_dispatch
from moetuner.model_layout import ModelLayout, layout_from_record, resolve_layout
from moetuner.placement import Placement, PlacementError, logical_replica_count, save_placement, validate_phy2log

log = logging.getLogger(__name__)

ENGINES = ("sglang", "vllm", "trtllm")
SUFFIXES = {"sglang": ".sglang.json", "vllm": ".vllm.jsonl", "trtllm": ".trtllm.yaml"}
"""Engine -> the suffix of its file beside the placement (`<stem><suffix>`)."""
TRTLLM_OPTIONS_SUFFIX = ".trtllm-options.yaml"  # the --extra_llm_api_options file naming the load balancer

SGLANG_DISPATCH = {"dynamic": "dynamic", "static": "static", "lp": "lp", "lp_comm": "lp"}
"""SGLang 0.5.23 `--ep-dispatch-algorithm` for each of our dispatches (SGLang has no lp_comm)."""
SGLANG_NO_EXPERT_LOCATION = ("MixtralForCausalLM", "OlmoeForCausalLM")
"""Architectures without `get_model_config_for_expert_location` in SGLang 0.5.23: no expert-location map."""
TRTLLM_BALANCER_ARCHITECTURES = ("DeepseekV3ForCausalLM", "MixtralForCausalLM", "Llama4ForConditionalGeneration",
                                 "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
"""TensorRT-LLM's `moe_model_arch_list` (`_torch/modules/fused_moe/moe_load_balancer.py`): the load balancer
is created only for these; for any other architecture the file is silently ignored."""
VLLM_MAX_REPLICAS = 1024  # `_load_initial_mapping` refuses an expert with more replicas


class EngineFileError(ValueError):
    """An engine file is malformed or would be misread by its engine; the message names file and fix."""


def fill_empty_slots(phy2log: np.ndarray, num_gpus: int) -> tuple[np.ndarray, int]:
    """Give every empty slot (-1) an expert, as engines load weights into every slot.

    An empty slot on GPU g gets a copy of the expert with the largest share of its copies on g; when
    all its copies are on g, an even split over them leaves every GPU's load as it was. A GPU with no
    expert gets a copy of the expert with the most copies. Returns the filled [L, P] map and how many
    fills change the even split.
    """
    out = phy2log.copy()
    slots_per_gpu = out.shape[1] // num_gpus
    changed = 0
    for row in out:
        grid = row.reshape(num_gpus, slots_per_gpu)  # a view: writes go to `out`
        for gpu, slot in zip(*np.nonzero(grid < 0)):
            experts = np.unique(grid[gpu][grid[gpu] >= 0])
            if len(experts) == 0:
                ids, counts = np.unique(row[row >= 0], return_counts=True)
                expert, share = int(ids[np.argmax(counts)]), 0.0
            else:
                on_gpu = (grid[gpu][None, :] == experts[:, None]).sum(1)
                total = (row[None, :] == experts[:, None]).sum(1)
                best = int(np.argmax(on_gpu / total))
                expert, share = int(experts[best]), on_gpu[best] / total[best]
            changed += share < 1.0
            grid[gpu, slot] = expert
    return out, int(changed)


def check_exportable(phy2log: np.ndarray, num_experts: int, ep_size: int) -> None:
    """Everything an engine may leave unchecked, for a filled map [L, P]; raise PlacementError naming it.

    Ids in [0, E) (SGLang reads -1 as expert E-1), every expert of every layer on a slot (SGLang's static
    dispatch divides by zero otherwise), P >= E, P % ep_size == 0, at most 1024 copies of an expert (vLLM).
    """
    validate_phy2log(phy2log, num_experts, ep_size)
    if phy2log.size and phy2log.min() < 0:
        raise PlacementError("the map still has empty slots (-1); fill them (fill_empty_slots) before export")
    copies = logical_replica_count(phy2log, num_experts).max(initial=0)
    if copies > VLLM_MAX_REPLICAS:
        raise PlacementError(f"an expert has {copies} slots; vLLM refuses more than {VLLM_MAX_REPLICAS}")


def trivial_row(num_experts: int, num_slots: int) -> list[int]:
    """SGLang's (and vLLM's) default layout of one layer: slot i holds expert i % E. [P]"""
    return [i % num_experts for i in range(num_slots)]


def sglang_document(phy2log: np.ndarray, layout: ModelLayout, num_experts: int) -> dict[str, Any]:
    """`{"physical_to_logical_map": [num_hidden_layers][P]}`: MoE rows from the map, dense rows trivial."""
    rows = [trivial_row(num_experts, phy2log.shape[1])] * layout.num_hidden_layers
    for row, layer in zip(phy2log, layout.moe_layers):
        rows[layer] = [int(x) for x in row]
    return {"physical_to_logical_map": rows}


def vllm_record(phy2log: np.ndarray, num_experts: int) -> dict[str, Any]:
    """vLLM PR #41141's `eplb_initial_mapping` record, keyed by MoE-layer ordinal."""
    return {"record_type": "eplb_initial_mapping", "version": 1,
            "num_redundant_experts": int(phy2log.shape[1] - num_experts), "num_slots": int(phy2log.shape[1]),
            "initial_global_assignments": {str(i): [int(x) for x in row] for i, row in enumerate(phy2log)}}


def trtllm_document(phy2log: np.ndarray, layout: ModelLayout) -> dict[str, Any]:
    """TensorRT-LLM's `MoeLoadBalancerConfig`, static (`layer_updates_per_iter: 0`), keyed by decoder layer."""
    return {"num_slots": int(phy2log.shape[1]), "layer_updates_per_iter": 0,
            "initial_global_assignments": {int(layer): [int(x) for x in row]
                                           for layer, row in zip(layout.moe_layers, phy2log)}}


def _dump_yaml(doc: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(doc), default_flow_style=None, sort_keys=False, width=1 << 16)


def write_engine_file(engine: str, phy2log: np.ndarray, layout: ModelLayout, num_experts: int,
                      path: str | os.PathLike[str]) -> Path:
    """Write `engine`'s file of a filled, checked map [L, P] to `path` (atomic)."""
    if engine == "sglang":
        return write_json_atomic(path, sglang_document(phy2log, layout, num_experts), indent=None)
    if engine == "vllm":
        line = json.dumps(vllm_record(phy2log, num_experts)) + "\n"
        return write_atomic(path, lambda tmp: Path(tmp).write_text(line))
    if engine == "trtllm":
        text = _dump_yaml(trtllm_document(phy2log, layout))
        return write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    raise EngineFileError(f"unknown engine {engine!r}; choose from {list(ENGINES)}")


# --- decoding an engine file back, strictly -----------------------------------------------------------


def _check_rows(rows: Any, count: int, num_slots: int | None, num_experts: int, where: str) -> np.ndarray:
    """rows: `count` lists of `num_slots` ints in [0, E), each covering every expert. -> int64 [count, P]"""
    if not isinstance(rows, list) or len(rows) != count:
        raise EngineFileError(f"{where}: expected {count} rows, got "
                              f"{len(rows) if isinstance(rows, list) else type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in row):
            raise EngineFileError(f"{where}: row {i} is not a list of integer expert ids")
    width = num_slots if num_slots is not None else len(rows[0])
    if any(len(row) != width for row in rows):
        raise EngineFileError(f"{where}: rows must all have {width} slots")
    out = np.asarray(rows, dtype=np.int64).reshape(count, width)
    if out.size and (out.min() < 0 or out.max() >= num_experts):
        raise EngineFileError(f"{where}: expert id outside [0, {num_experts}) "
                              f"(range [{out.min()}, {out.max()}]); was it written for another model?")
    missing = np.argwhere(logical_replica_count(out, num_experts) == 0)
    if len(missing):
        raise EngineFileError(f"{where}: expert {missing[0][1]} has no slot in row {missing[0][0]}; every expert "
                              f"needs a slot")
    return out


def _exact_keys(doc: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(doc, dict) or set(doc) != set(keys):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise EngineFileError(f"{where}: keys must be exactly {sorted(keys)}, found {found}")


def _layer_rows(assignments: Any, keys: list, num_slots: int, num_experts: int, where: str) -> np.ndarray:
    if not isinstance(assignments, dict) or set(assignments) != set(keys):
        found = sorted(assignments, key=str) if isinstance(assignments, dict) else type(assignments).__name__
        raise EngineFileError(f"{where}: initial_global_assignments must be keyed exactly {keys}, found {found}; "
                              f"a key shifted by one layer means the file was written for another layer layout")
    return _check_rows([assignments[k] for k in keys], len(keys), num_slots, num_experts, where)


def read_sglang_file(path: str | os.PathLike[str], layout: ModelLayout, num_experts: int) -> np.ndarray:
    """MoE rows [L, P] of an SGLang file: exactly one key, num_hidden_layers rows, dense rows trivial."""
    doc = json.loads(Path(path).read_text())
    _exact_keys(doc, ["physical_to_logical_map"], str(path))
    rows = _check_rows(doc["physical_to_logical_map"], layout.num_hidden_layers, None, num_experts, str(path))
    trivial = trivial_row(num_experts, rows.shape[1])
    shifted = [i for i in layout.dense_layers if rows[i].tolist() != trivial]
    if shifted:
        raise EngineFileError(f"{path}: dense decoder layer(s) {shifted} have a non-trivial row; SGLang indexes rows "
                              f"by decoder layer, so the MoE rows are shifted (written for another layout?)")
    return rows[list(layout.moe_layers)]


def read_vllm_file(path: str | os.PathLike[str], layout: ModelLayout, num_experts: int) -> np.ndarray:
    """MoE rows [L, P] of the last `eplb_initial_mapping` record of a vLLM JSONL file, keys "0".."L-1"."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    mappings = [r for r in records if isinstance(r, dict) and r.get("record_type") == "eplb_initial_mapping"]
    if not mappings:
        raise EngineFileError(f"{path}: no record with record_type 'eplb_initial_mapping'")
    doc = mappings[-1]
    _exact_keys(doc, ["record_type", "version", "num_redundant_experts", "num_slots", "initial_global_assignments"],
                str(path))
    if doc["version"] != 1 or doc["num_slots"] != num_experts + doc["num_redundant_experts"]:
        raise EngineFileError(f"{path}: version {doc['version']} (must be 1), num_slots {doc['num_slots']} "
                              f"(must be {num_experts} experts + {doc['num_redundant_experts']} redundant)")
    keys = [str(i) for i in range(len(layout.moe_layers))]
    return _layer_rows(doc["initial_global_assignments"], keys, doc["num_slots"], num_experts, str(path))


def read_trtllm_file(path: str | os.PathLike[str], layout: ModelLayout, num_experts: int) -> np.ndarray:
    """MoE rows [L, P] of a TensorRT-LLM load-balancer YAML, keyed by the decoder index of each MoE layer."""
    doc = yaml.safe_load(Path(path).read_text())
    _exact_keys(doc, ["num_slots", "layer_updates_per_iter", "initial_global_assignments"], str(path))
    if doc["layer_updates_per_iter"] != 0:
        raise EngineFileError(f"{path}: layer_updates_per_iter={doc['layer_updates_per_iter']}; a static placement "
                              f"needs 0 (else TensorRT-LLM's online balancer moves it)")
    return _layer_rows(doc["initial_global_assignments"], list(layout.moe_layers), doc["num_slots"], num_experts,
                       str(path))


READERS = {"sglang": read_sglang_file, "vllm": read_vllm_file, "trtllm": read_trtllm_file}


def read_engine_file(engine: str, path: str | os.PathLike[str], layout: ModelLayout, num_experts: int) -> np.ndarray:
    """The placement's MoE rows [L, P] as `engine` would read `path`, refusing anything it might misread."""
    if engine not in READERS:
        raise EngineFileError(f"unknown engine {engine!r}; choose from {list(ENGINES)}")
    return READERS[engine](path, layout, num_experts)


# --- flags and warnings -----------------------------------------------------------------------------------


def engine_warnings(layout: ModelLayout, ep_size: int) -> dict[str, list[str]]:
    """Per engine, where it would silently ignore (or cannot use) its file for this model and EP size."""
    arch = layout.architecture
    out: dict[str, list[str]] = {engine: [] for engine in ENGINES}
    if arch in SGLANG_NO_EXPERT_LOCATION:
        out["sglang"].append(f"SGLang 0.5.23 has no expert-location support for {arch} "
                             f"(no get_model_config_for_expert_location): it cannot use this file")
    if arch not in TRTLLM_BALANCER_ARCHITECTURES:
        which = "an unknown architecture (give model_config= to check)" if arch == "unknown" else arch
        out["trtllm"].append(f"TensorRT-LLM creates its load balancer only for {list(TRTLLM_BALANCER_ARCHITECTURES)}; "
                             f"for {which} it silently ignores moe_config.load_balancer")
    if ep_size <= 1:
        out["trtllm"].append("TensorRT-LLM creates its load balancer only with moe_ep_size > 1: at EP size 1 the "
                             "file is silently ignored")
    out["vllm"].append("needs vLLM with PR #41141 (eplb-config initial_mapping_path); released vLLM (0.34) rejects "
                       "these eplb-config keys and has no way to load a placement")
    return out


def engine_settings(placement: Placement, num_experts: int, files: Mapping[str, str | os.PathLike[str]],
                    layout: ModelLayout) -> dict[str, Any]:
    """How to serve `placement` with each engine in `files`: flags, notes and warnings (the `engines` block).

    The dispatch the placement was solved for (`extra["dispatch"]`, default dynamic) picks SGLang's
    `--ep-dispatch-algorithm`; the redundant experts are all slots beyond one per expert, P - E.
    """
    dispatch = check_dispatch(placement.extra.get("dispatch", "dynamic"), PlacementError, "placement dispatch")
    redundant = int(placement.phy2log.shape[1]) - num_experts
    if redundant < 0:
        raise PlacementError(f"placement has {placement.phy2log.shape[1]} slots per layer for {num_experts} "
                             f"experts; an engine needs at least one slot per expert")
    gpus = str(placement.num_gpus)
    warnings = engine_warnings(layout, placement.num_gpus)
    block: dict[str, Any] = {"dispatch": dispatch, "num_hidden_layers": layout.num_hidden_layers,
                             "moe_layers": list(layout.moe_layers)}
    if "sglang" in files:
        algorithm = SGLANG_DISPATCH[dispatch]
        notes = ["Leave --enable-eplb off: SGLang's own EPLB would replace this placement."]
        if dispatch != algorithm:
            notes.append(f"Solved for dispatch={dispatch}; SGLang has no such dispatch, its nearest is "
                         f"{algorithm} (balances load per batch, ignores communication).")
        if algorithm in ("static", "lp"):
            notes.append(f"--ep-dispatch-algorithm {algorithm} needs an all-to-all backend "
                         f"(--moe-a2a-backend deepep or similar); with none SGLang refuses it.")
        block["sglang"] = {"file": str(files["sglang"]), "notes": notes, "warnings": warnings["sglang"], "flags": [
            "--tp-size", gpus, "--ep-size", gpus, "--nnodes", str(placement.num_nodes), "--init-expert-location",
            str(files["sglang"]), "--ep-num-redundant-experts", str(redundant), "--ep-dispatch-algorithm", algorithm]}
    if "vllm" in files:
        config = {"num_redundant_experts": redundant, "initial_mapping_path": str(files["vllm"]),
                  "disable_online_rebalancing": True}
        block["vllm"] = {"file": str(files["vllm"]), "warnings": warnings["vllm"], "flags": [
            "--tensor-parallel-size", gpus, "--enable-expert-parallel", "--enable-eplb", "--eplb-config",
            json.dumps(config)],
            "notes": ["disable_online_rebalancing keeps the placement; without it vLLM's EPLB rebalances every "
                      "step_interval steps (3000 by default)."]}
    if "trtllm" in files:
        options = str(files["trtllm_options"])
        block["trtllm"] = {"file": str(files["trtllm"]), "options_file": options, "warnings": warnings["trtllm"],
                           "flags": ["--tp_size", gpus, "--ep_size", gpus, "--extra_llm_api_options", options],
                           "notes": ["The options file sets moe_config.load_balancer to the file; "
                                     "layer_updates_per_iter 0 keeps the placement static."]}
    return block


def check_engines(engines: Sequence[str]) -> None:
    """Raise EngineFileError unless every name is one of ENGINES."""
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise EngineFileError(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")


def export_engine_files(placement: Placement, num_experts: int, layout: ModelLayout, stem: str | os.PathLike[str],
                        engines: Sequence[str] = ENGINES) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write `<stem><suffix>` for each engine, read each back strictly, and return (files, engines block).

    Empty slots are filled first (`fill_empty_slots`; a warning says when that changes GPU loads), and the
    filled map is checked (`check_exportable`) before anything is written.
    """
    check_engines(engines)
    layout = resolve_layout(placement.extra, layout, placement.num_layers, f"placement {stem}")
    validate_phy2log(placement.phy2log, num_experts, placement.num_gpus)
    phy2log, changed = fill_empty_slots(placement.phy2log, placement.num_gpus)
    if changed:
        log.warning("%s: %d empty slot(s) got a copy of an expert that also sits on another GPU, which shifts load "
                    "under an even split; solve with every slot filled to avoid it", stem, changed)
    check_exportable(phy2log, num_experts, placement.num_gpus)
    files: dict[str, Path] = {}
    for engine in engines:
        path = write_engine_file(engine, phy2log, layout, num_experts, f"{stem}{SUFFIXES[engine]}")
        back = read_engine_file(engine, path, layout, num_experts)
        assert np.array_equal(back, phy2log), f"{path} does not decode to the placement it was written from"
        files[engine] = path
    if "trtllm" in files:
        text = _dump_yaml({"moe_config": {"load_balancer": str(files["trtllm"])}})
        files["trtllm_options"] = write_atomic(f"{stem}{TRTLLM_OPTIONS_SUFFIX}", lambda tmp: Path(tmp).write_text(text))
    block = engine_settings(placement, num_experts, files, layout)
    for engine in engines:
        log.info("%s: %s", engine, shlex.join(block[engine]["flags"]))
        for line in block[engine]["warnings"]:
            log.warning("%s: %s", engine, line)
    return files, block


def write_placement(placement: Placement, num_experts: int, out: str | Path,
                    layout: ModelLayout | None = None) -> list[Path]:
    """Engine files, then the placement JSON at `out` with an `engines` block (all atomic).

    layout: the model's decoder layers (None: the ones the placement records, `layout_from_record`);
    when neither knows them, no engine file is written and the block says why. `out` is written last, so
    a complete `out` means the engine files are there too. Returns [out, *engine files].
    """
    out = Path(out)
    if layout_from_record(placement.extra, f"placement {out}") is None and layout is None:
        why = ("the model's decoder layers are unknown (the trace records no num_hidden_layers); "
               "export with moetuner-export model_config=PATH/config.json")
        log.warning("%s: no engine files: %s", out, why)
        recorded = dataclasses.replace(placement, extra={**placement.extra, "engines": {"missing": why}})
        return [save_placement(recorded, out)]
    layout = resolve_layout(placement.extra, layout, placement.num_layers, f"placement {out}")
    files, block = export_engine_files(placement, num_experts, layout, out.with_suffix(""))
    model = {"num_hidden_layers": layout.num_hidden_layers, "moe_layers": list(layout.moe_layers),
             "architecture": layout.architecture}  # so that a later moetuner-export needs no config
    recorded = dataclasses.replace(placement, extra={**placement.extra, **model, "engines": block})
    return [save_placement(recorded, out), *files.values()]
