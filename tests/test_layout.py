"""moetuner.placement: validation errors, JSON round trip, replica maps against hand maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moetuner.placement import (Placement, PlacementError, contiguous_phy2log, load_placement,
                                logical_replica_count, logical_to_physical_map, save_placement)

# 2 layers, 2 GPUs x 3 slots, 4 experts; layer 0 replicates expert 0, layer 1 leaves a slot empty
PHY2LOG = np.array([[0, 1, 0, 2, 3, 0],
                    [3, 2, -1, 1, 0, 1]])
REPLICA_COUNT = [[3, 1, 1, 1], [1, 2, 1, 1]]
LOG2PHY = [[[0, 2, 5], [1, -1, -1], [3, -1, -1], [4, -1, -1]],
           [[4, -1, -1], [3, 5, -1], [1, -1, -1], [0, -1, -1]]]


def placement() -> Placement:
    return Placement(phy2log=PHY2LOG.copy(), num_gpus=2, num_nodes=1, solver="hand", objective=1.5,
                     bound=1.0, solve_seconds=0.25, status="feasible", extra={"note": "x"})


def test_hand_maps() -> None:
    assert logical_replica_count(PHY2LOG, 4).tolist() == REPLICA_COUNT
    assert logical_to_physical_map(PHY2LOG, 4).tolist() == LOG2PHY
    p = placement()
    assert p.slots_per_gpu == 3 and p.gpu_of_slot().tolist() == [0, 0, 0, 1, 1, 1]
    assert p.validate(4) is p


def test_contiguous_by_hand() -> None:
    assert contiguous_phy2log(1, 6, 4, 2).tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]]
    assert contiguous_phy2log(2, 4, 2, 3).tolist() == [[0, 1, -1, 2, 3, -1]] * 2


@pytest.mark.parametrize("phy2log,num_experts,num_gpus,message", [
    (np.zeros(4, dtype=np.int64), 4, 2, "must be \\[L, P\\]"),
    (np.zeros((1, 5), dtype=np.int64), 4, 2, "cannot be split over 2 GPUs"),
    (np.array([[0, 1, 2, 4]]), 4, 2, "expert ids must be in \\[-1, 4\\)"),
    (np.array([[0, 1, -2, 3]]), 4, 2, "expert ids must be in"),
    (np.array([[0, 1, 1, 3]]), 4, 2, "expert 2 of layer 0 has no slot"),
])
def test_validation_errors(phy2log: np.ndarray, num_experts: int, num_gpus: int, message: str) -> None:
    p = Placement(phy2log=phy2log, num_gpus=num_gpus, num_nodes=1, solver="hand")
    with pytest.raises(PlacementError, match=message):
        p.validate(num_experts)


def test_required_mask() -> None:
    p = Placement(phy2log=np.array([[0, 1, 1, 3]]), num_gpus=2, num_nodes=1, solver="hand")
    p.validate(4, required=np.array([[True, True, False, True]]))  # expert 2 is never routed to
    with pytest.raises(PlacementError, match="routing has 2 layers"):
        p.validate(4, required=np.ones((2, 4), dtype=bool))


def test_nodes_must_divide_gpus() -> None:
    p = Placement(phy2log=PHY2LOG.copy(), num_gpus=2, num_nodes=3, solver="hand")
    with pytest.raises(PlacementError, match="not a multiple of num_nodes=3"):
        p.validate(4)


def test_json_round_trip(tmp_path: Path) -> None:
    path = save_placement(placement(), tmp_path / "p.json")
    doc = json.loads(path.read_text())
    assert doc["physical_to_logical_map"] == PHY2LOG.tolist()  # SGLang's --init-expert-location key
    back = load_placement(path)
    assert np.array_equal(back.phy2log, PHY2LOG)
    assert (back.num_gpus, back.num_nodes, back.solver, back.status) == (2, 1, "hand", "feasible")
    assert (back.objective, back.bound, back.solve_seconds) == (1.5, 1.0, 0.25)
    assert back.extra == {"note": "x"}


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match="no such placement file"):
        load_placement(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlacementError, match="not valid JSON"):
        load_placement(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text(json.dumps({"physical_to_logical_map": [[0]]}))
    with pytest.raises(PlacementError, match="missing field 'num_gpus'"):
        load_placement(tmp_path / "short.json")
