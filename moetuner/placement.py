"""The placement contract: the layout shared with DeepSeek EPLB, vLLM and SGLang (docs/formulation.md section 2).

`phy2log` [L, P], P = G * S: the logical expert held by physical slot s in layer l; slot s lives on
GPU s // S; -1 marks an empty slot; an expert may hold several slots (replicas).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moetuner.atomic import write_json_atomic

class PlacementError(ValueError):
    """A placement is malformed or does not fit a model/topology; the message names the fix."""


@dataclass
class Placement:
    """A placement plus how it was made."""

    phy2log: np.ndarray  # int64 [L, P]
    num_gpus: int
    num_nodes: int
    solver: str
    objective: float | None = None  # the solver's own objective value
    bound: float | None = None  # a proven lower bound on that objective, if any
    solve_seconds: float = 0.0
    status: str = "heuristic"  # optimal | feasible (a MIP limit stopped it) | heuristic | fallback
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def slots_per_gpu(self) -> int:
        return int(self.phy2log.shape[1]) // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def gpu_of_slot(self) -> np.ndarray:
        """GPU of every physical slot. [P]"""
        return slot_gpus(self.phy2log.shape[1], self.num_gpus)

    def replica_counts(self, num_experts: int) -> np.ndarray:
        """Slots held by each expert in each layer. [L, E]"""
        return logical_replica_count(self.phy2log, num_experts)

    def validate(self, num_experts: int, required: np.ndarray | None = None) -> "Placement":
        """Raise PlacementError unless ids are in range and every required expert has a slot.

        required: bool [L, E], experts that routing can choose (default: all of them).
        """
        validate_phy2log(self.phy2log, num_experts, self.num_gpus, required)
        if self.num_nodes < 1 or self.num_gpus % self.num_nodes:
            raise PlacementError(f"num_gpus={self.num_gpus} is not a multiple of num_nodes={self.num_nodes}; "
                                 f"fix num_nodes in the placement JSON")
        return self

    def to_json(self) -> dict[str, Any]:
        """physical_to_logical_map plus our solve record (not an engine file: see moetuner.engines)."""
        doc = {
            "physical_to_logical_map": self.phy2log.astype(int).tolist(),
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "gpus_per_node": self.gpus_per_node,
            "solver": self.solver,
            "objective": self.objective,
            "bound": self.bound,
            "solve_seconds": self.solve_seconds,
            "status": self.status,
        }
        doc.update(self.extra)
        return doc


def validate_phy2log(phy2log: np.ndarray, num_experts: int, num_gpus: int,
                     required: np.ndarray | None = None) -> None:
    """Check a [L, P] map: P divisible by G, ids in [-1, E), every required expert placed per layer."""
    if phy2log.ndim != 2:
        raise PlacementError(f"physical_to_logical_map must be [L, P], got shape {phy2log.shape}")
    num_layers, num_slots = phy2log.shape
    if num_gpus < 1 or num_slots % num_gpus:
        raise PlacementError(f"{num_slots} physical slots per layer cannot be split over {num_gpus} GPUs")
    if phy2log.size and (phy2log.min() < -1 or phy2log.max() >= num_experts):
        raise PlacementError(f"expert ids must be in [-1, {num_experts}), got range "
                             f"[{phy2log.min()}, {phy2log.max()}]; was the placement solved for "
                             f"a model with another expert count?")
    if required is None:
        required = np.ones((num_layers, num_experts), dtype=bool)
    if required.shape != (num_layers, num_experts):
        raise PlacementError(f"placement has {num_layers} layers but the routing has "
                             f"{required.shape[0]} layers of {required.shape[1]} experts")
    placed = logical_replica_count(phy2log, num_experts) > 0
    missing = np.argwhere(required & ~placed)
    if len(missing):
        layer, expert = missing[0]
        raise PlacementError(f"expert {expert} of layer {layer} has no slot ({len(missing)} "
                             f"(layer, expert) pairs missing); every expert that routing can "
                             f"choose needs at least one slot")


def check_placement(placement: Placement, num_gpus: int, num_experts: int, num_layers: int,
                    gpus_per_node: int | None = None, routed: np.ndarray | None = None,
                    topology: str = "the topology") -> None:
    """The one check that a placement fits a topology and a model/trace; raise PlacementError naming the fix.

    num_gpus, gpus_per_node (None: any node split): the topology `topology` (a name, for messages);
    num_experts, num_layers: the model or trace; routed: bool [L, E] experts that routing can choose
    (None: every expert needs a slot, as in a served model).
    """
    fix = f"solve a placement for {topology} (moetuner-solve topology=...)"
    if gpus_per_node is None and placement.num_gpus != num_gpus:
        raise PlacementError(f"placement is for {placement.num_gpus} GPUs but {topology} has {num_gpus}; {fix}")
    if gpus_per_node is not None and (placement.num_gpus, placement.num_nodes) != (num_gpus, num_gpus // gpus_per_node):
        raise PlacementError(f"placement is for {placement.num_nodes} node(s) x {placement.num_gpus} GPUs but "
                             f"{topology} has {num_gpus // gpus_per_node} node(s) x {gpus_per_node} GPUs; {fix}")
    solved_for = placement.extra.get("num_experts")
    if solved_for is not None and int(solved_for) != num_experts:
        raise PlacementError(f"placement was solved for {solved_for} experts but the model has {num_experts}; "
                             f"solve a placement from a trace of this model")
    if placement.phy2log.ndim == 2 and placement.num_layers != num_layers:
        raise PlacementError(f"placement has {placement.num_layers} layers but the model has {num_layers} "
                             f"MoE layers; solve a placement from a trace of this model")
    if routed is not None and routed.shape != (num_layers, num_experts):
        raise PlacementError(f"routed experts must be [L, E] = [{num_layers}, {num_experts}], got {routed.shape}")
    placement.validate(num_experts, routed)


def routed_experts(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Experts that routing chose at least once per layer. [T, L, k] -> bool [L, E]"""
    num_layers = topk_ids.shape[1]
    flat = (np.arange(num_layers)[None, :, None] * num_experts + topk_ids).ravel()
    return (np.bincount(flat, minlength=num_layers * num_experts) > 0).reshape(num_layers, num_experts)


def logical_replica_count(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """Slots per logical expert. [L, P] -> [L, E]"""
    counts = np.zeros((phy2log.shape[0], num_experts), dtype=np.int64)
    for layer, row in enumerate(phy2log):
        ids = row[row >= 0]
        np.add.at(counts[layer], ids, 1)
    return counts


def gpu_loads(phy2log: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """Tokens per GPU, a replicated expert's load split evenly over its slots; leading axes of `load` (e.g.
    steps) are kept. [L, P], [..., L, E] -> [..., L, G]"""
    num_slots = phy2log.shape[1]
    assert num_slots % num_gpus == 0, f"{num_slots} slots do not divide over {num_gpus} GPUs"
    replicas = logical_replica_count(phy2log, load.shape[-1])
    share = np.where(replicas > 0, load / np.maximum(replicas, 1), 0.0)  # [..., L, E] tokens per replica
    slots = np.broadcast_to(np.maximum(phy2log, 0), (*load.shape[:-1], num_slots))
    per_slot = np.where(phy2log >= 0, np.take_along_axis(share, slots, axis=-1), 0.0)
    return per_slot.reshape(*load.shape[:-1], num_gpus, -1).sum(-1)


def logical_to_physical_map(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """vLLM's [L, E, max replicas] map of each expert's slots, -1 padded."""
    counts = logical_replica_count(phy2log, num_experts)
    width = max(1, int(counts.max(initial=1)))
    log2phy = -np.ones((phy2log.shape[0], num_experts, width), dtype=np.int64)
    for layer, row in enumerate(phy2log):
        fill = np.zeros(num_experts, dtype=np.int64)
        for slot, expert in enumerate(row):
            if expert >= 0:
                log2phy[layer, expert, fill[expert]] = slot
                fill[expert] += 1
    return log2phy


def slot_gpus(num_slots: int, num_gpus: int) -> np.ndarray:
    """GPU of every physical slot: slot s lives on GPU s // (P / G). -> [P]"""
    assert num_slots % num_gpus == 0, f"{num_slots} slots do not divide over {num_gpus} GPUs"
    return np.arange(num_slots) // (num_slots // num_gpus)


@dataclass(frozen=True)
class LayerSlots:
    """One layer of a placement, indexed for routing."""

    log2phy: np.ndarray  # [E, R] slots of each expert, -1 padded
    count: np.ndarray  # [E] replicas per expert
    gpu_of_slot: np.ndarray  # [P]

    @property
    def num_slots(self) -> int:
        return len(self.gpu_of_slot)


@dataclass(frozen=True)
class ExpertLocation:
    """The maps a placement derives, computed once (as SGLang's ExpertLocationMetadata): read by the
    simulator, the batched cost path, the static dispatch table and the serving replay."""

    phy2log: np.ndarray  # [L, P]
    log2phy: np.ndarray  # [L, E, R] slots of each expert, -1 padded (vLLM's logical_to_physical_map)
    count: np.ndarray  # [L, E] replicas per expert (logical_replica_count)
    gpu_of_slot: np.ndarray  # [P]

    @property
    def num_gpus(self) -> int:
        return int(self.gpu_of_slot[-1]) + 1

    @property
    def slots_per_gpu(self) -> int:
        return len(self.gpu_of_slot) // self.num_gpus

    def layer(self, layer: int) -> LayerSlots:
        """The routing tables of one layer."""
        return LayerSlots(self.log2phy[layer], self.count[layer], self.gpu_of_slot)

    def layers(self) -> list[LayerSlots]:
        """The routing tables of every layer. [L]"""
        return [self.layer(layer) for layer in range(self.phy2log.shape[0])]


def expert_location(phy2log: np.ndarray, num_gpus: int, num_experts: int) -> ExpertLocation:
    """log2phy, replica counts and the GPU of every slot of a [L, P] placement."""
    return ExpertLocation(phy2log, logical_to_physical_map(phy2log, num_experts),
                          logical_replica_count(phy2log, num_experts), slot_gpus(phy2log.shape[1], num_gpus))


def contiguous_phy2log(num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """Megatron/DeepSpeed default: expert e on GPU e // ceil(E/G), extra slots empty (-1). [L, P]"""
    base = -(-num_experts // num_gpus)
    assert slots_per_gpu >= base, "slots_per_gpu must hold ceil(E/G) experts"
    row = -np.ones(num_gpus * slots_per_gpu, dtype=np.int64)
    for e in range(num_experts):
        gpu, i = divmod(e, base)
        row[gpu * slots_per_gpu + i] = e
    return np.tile(row, (num_layers, 1))


def save_placement(placement: Placement, path: str | os.PathLike[str]) -> Path:
    """Write the placement JSON atomically."""
    return write_json_atomic(path, placement.to_json(), indent=None)


def load_placement(path: str | os.PathLike[str]) -> Placement:
    """Read a placement JSON (ours, or an SGLang physical_to_logical_map file with num_gpus)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlacementError(f"{path}: no such placement file; make one with moetuner-solve") from None
    except json.JSONDecodeError as err:
        raise PlacementError(f"{path}: not valid JSON ({err})") from None
    for key in ("physical_to_logical_map", "num_gpus"):
        if key not in doc:
            raise PlacementError(f"{path}: missing field {key!r}")
    known = {"physical_to_logical_map", "num_gpus", "num_nodes", "gpus_per_node", "solver",
             "objective", "bound", "solve_seconds", "status"}
    return Placement(
        phy2log=np.asarray(doc["physical_to_logical_map"], dtype=np.int64),
        num_gpus=int(doc["num_gpus"]), num_nodes=int(doc.get("num_nodes", 1)),
        solver=str(doc.get("solver", "unknown")), objective=doc.get("objective"),
        bound=doc.get("bound"), solve_seconds=float(doc.get("solve_seconds", 0.0)),
        status=str(doc.get("status", "unknown")),
        extra={k: v for k, v in doc.items() if k not in known},
    )
