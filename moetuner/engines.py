"""Engine files and flags of a placement: SGLang's `--init-expert-location`, vLLM's EPLB maps (JSON and torch);
docs/formulation.md section 7.

SGLang 0.5.23 and vLLM 0.33 are the engines these files were checked against (tests/test_engine_conformance.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from moetuner.atomic import write_atomic, write_json_atomic
from moetuner.costmodel.settings import check_dispatch
from moetuner.placement import (Placement, PlacementError, logical_to_physical_map, save_placement,
                                validate_phy2log)

log = logging.getLogger(__name__)


def export_vllm(placement: Placement, num_experts: int, path: str | os.PathLike[str]) -> Path:
    """vLLM EPLB state: physical_to_logical_map, logical_to_physical_map, logical_replica_count."""
    doc = {
        "physical_to_logical_map": placement.phy2log.tolist(),
        "logical_to_physical_map": logical_to_physical_map(placement.phy2log, num_experts).tolist(),
        "logical_replica_count": placement.replica_counts(num_experts).tolist(),
    }
    return write_json_atomic(path, doc, indent=None)


def export_torch(placement: Placement, num_experts: int, path: str | os.PathLike[str]) -> Path:
    """The same three maps as int64 torch tensors in one `.pt` file."""
    import torch

    state = {
        "physical_to_logical_map": torch.from_numpy(placement.phy2log.astype(np.int64)),
        "logical_to_physical_map": torch.from_numpy(logical_to_physical_map(placement.phy2log, num_experts)),
        "logical_replica_count": torch.from_numpy(placement.replica_counts(num_experts)),
    }
    return write_atomic(path, lambda tmp: torch.save(state, tmp))


SGLANG_DISPATCH = {"dynamic": "dynamic", "static": "static", "lp": "lp", "lp_comm": "lp"}
"""SGLang 0.5.23 `--ep-dispatch-algorithm` for each of our dispatches (SGLang has no lp_comm)."""


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


def engine_settings(placement: Placement, num_experts: int, sglang_file: str | os.PathLike[str],
                    vllm_files: tuple[str, ...] = ()) -> dict[str, Any]:
    """How to serve `placement` with SGLang 0.5.23 and vLLM 0.33: flags and notes (the `engines` block).

    The dispatch the placement was solved for (`extra["dispatch"]`, default dynamic) picks SGLang's
    `--ep-dispatch-algorithm`; the redundant experts are all slots beyond one per expert, P - E.
    """
    dispatch = check_dispatch(placement.extra.get("dispatch", "dynamic"), PlacementError, "placement dispatch")
    redundant = int(placement.phy2log.shape[1]) - num_experts
    if redundant < 0:
        raise PlacementError(f"placement has {placement.phy2log.shape[1]} slots per layer for {num_experts} "
                             f"experts; an engine needs at least one slot per expert")
    algorithm = SGLANG_DISPATCH[dispatch]
    notes = ["Leave --enable-eplb off: SGLang's own EPLB would replace this placement."]
    if dispatch != algorithm:
        notes.append(f"Solved for dispatch={dispatch}; SGLang has no such dispatch, its nearest is "
                     f"{algorithm} (balances load per batch, ignores communication).")
    if algorithm in ("static", "lp"):
        notes.append(f"--ep-dispatch-algorithm {algorithm} needs an all-to-all backend "
                     f"(--moe-a2a-backend deepep or similar); with none SGLang refuses it.")
    gpus = str(placement.num_gpus)
    sglang = ["--tp-size", gpus, "--ep-size", gpus, "--nnodes", str(placement.num_nodes),
              "--init-expert-location", str(sglang_file), "--ep-num-redundant-experts", str(redundant),
              "--ep-dispatch-algorithm", algorithm]
    vllm = ["--enable-expert-parallel", "--enable-eplb", "--eplb-config",
            json.dumps({"num_redundant_experts": redundant})]
    return {
        "dispatch": dispatch,
        "sglang": {"file": str(sglang_file), "flags": sglang, "notes": notes},
        "vllm": {"files": [str(f) for f in vllm_files], "flags": vllm,
                 "notes": ["vLLM has no option to load a placement (its initial layout is linear or "
                           "round_robin): a start-up hook must put these maps in its EplbModelState and "
                           "move the weights to match (rebalance_execute.rearrange_expert_weights_inplace); "
                           "its EPLB then rebalances every eplb-config step_interval steps (3000 by default)."]},
    }


def export_sglang(placement: Placement, num_experts: int, path: str | os.PathLike[str]) -> Path:
    """SGLang's `--init-expert-location` file: exactly {"physical_to_logical_map": [L][P]}.

    SGLang passes the file's keys to `ExpertLocationMetadata.init_by_mapping` as keywords, so any other
    key is a TypeError, and reads every slot as an expert id (a -1 would index the last expert), so
    empty slots are filled (`fill_empty_slots`; a warning says when that changes GPU loads).
    """
    validate_phy2log(placement.phy2log, num_experts, placement.num_gpus)
    phy2log, changed = fill_empty_slots(placement.phy2log, placement.num_gpus)
    if changed:
        log.warning("%s: %d empty slot(s) got a copy of an expert that also sits on another GPU, which "
                    "shifts load under an even split; solve with every slot filled to avoid it", path, changed)
    return write_json_atomic(path, {"physical_to_logical_map": phy2log.astype(int).tolist()}, indent=None)


def write_placement(placement: Placement, num_experts: int, out: str | Path) -> list[Path]:
    """Engine files, then the placement JSON at `out` with an `engines` block of flags (all atomic).

    <stem>.sglang.json: SGLang's --init-expert-location file; <stem>.vllm.json and <stem>.pt: vLLM's
    EPLB maps. `out` is written last, so a complete `out` means the engine files are there too.
    Returns [out, <stem>.vllm.json, <stem>.pt, <stem>.sglang.json].
    """
    out = Path(out)
    sglang = export_sglang(placement, num_experts, out.with_suffix(".sglang.json"))
    vllm = [export_vllm(placement, num_experts, out.with_suffix(".vllm.json")),
            export_torch(placement, num_experts, out.with_suffix(".pt"))]
    engines = engine_settings(placement, num_experts, sglang, tuple(str(p) for p in vllm))
    for name in ("sglang", "vllm"):
        log.info("%s: %s", name, shlex.join(engines[name]["flags"]))
        for note in engines[name]["notes"]:
            log.info("%s: %s", name, note)
    recorded = dataclasses.replace(placement, extra={**placement.extra, "engines": engines})
    return [save_placement(recorded, out), *vllm, sglang]
