"""Conformance with a real engine's own code: SGLang 0.5.23, its wheel installed without dependencies.

- Our EPLB port against SGLang's copy of DeepSeek's (`srt/eplb/eplb_algorithms/deepseek.py`, which needs
  torch alone; loaded from its file, as `import sglang` runs the package's `__init__`, which needs
  SGLang's other dependencies and patches transformers).
- Our `<stem>.sglang.json` through SGLang's own `--init-expert-location` loader
  (`srt/eplb/expert_location.py`). That module imports `sglang.srt.runtime_context`, i.e. the whole
  package, so it is compiled from the installed source with its four runtime getters and the model
  lookup stubbed; everything else (file reading, `init_by_mapping(model_config, **data, moe_ep_rank=...)`,
  the logical-to-physical maps) is SGLang's code as shipped.
- vLLM is not tested: its wheel is 336 MB and `vllm/distributed/eplb/eplb_state.py` imports
  `vllm.config`, `vllm.platforms` and the model executor (docs/solvers.md, "Engine conformance").

`bash bootstrap.sh test` installs the wheel (`pip install --no-deps sglang==0.5.23`) and sets
MOETUNER_REQUIRE_SGLANG=1, which turns the skip without it into a failure.
"""

from __future__ import annotations

import __future__
import ast
import dataclasses
import importlib.metadata
import importlib.util
import inspect
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moetuner.engines import write_placement
from moetuner.solvers.registry import solve_placement
from moetuner.solvers.eplb import rebalance_experts
from moetuner.engines import SGLANG_DISPATCH, engine_settings, fill_empty_slots
from moetuner.placement import Placement, PlacementError, contiguous_phy2log, gpu_loads, logical_to_physical_map
from moetuner.solvers.problem import PlacementProblem
from moetuner.costmodel.settings import DISPATCHES
from test_eplb import GOLDEN_LOGCNT, GOLDEN_PHY2LOG, GOLDEN_WEIGHT
from test_solvers import random_trace, topology

SGLANG_VERSION = "0.5.23"


def _sglang_root() -> tuple[Path | None, str]:
    """The installed sglang package folder, or None and why not."""
    spec = importlib.util.find_spec("sglang")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None, f"sglang is not installed: pip install --no-deps sglang=={SGLANG_VERSION}"
    version = importlib.metadata.version("sglang")
    if version != SGLANG_VERSION:
        return None, f"sglang {version} is installed; these tests read {SGLANG_VERSION}'s code"
    return Path(spec.submodule_search_locations[0]), ""


SGLANG_ROOT, WHY_NOT = _sglang_root()
if SGLANG_ROOT is None and os.environ.get("MOETUNER_REQUIRE_SGLANG") == "1":
    raise RuntimeError(f"MOETUNER_REQUIRE_SGLANG=1 but {WHY_NOT}")
needs_sglang = pytest.mark.skipif(SGLANG_ROOT is None, reason=WHY_NOT)


def sglang_module(relative: str, drop_imports_from: str | None = None, **namespace: Any) -> dict[str, Any]:
    """Run SGLang's source file `relative` (under the package folder) in a fresh namespace; return it.

    drop_imports_from: skip the file's top-level `from <that package>... import` statements, whose
    names `namespace` then provides.
    """
    assert SGLANG_ROOT is not None
    path = SGLANG_ROOT / relative
    tree = ast.parse(path.read_text(), str(path))
    if drop_imports_from:
        tree.body = [node for node in tree.body if not (
            isinstance(node, ast.ImportFrom) and (node.module or "").startswith(drop_imports_from))]
    code = compile(tree, str(path), "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    module = types.ModuleType(f"sglang_source_{path.stem}")
    module.__dict__.update(namespace)
    sys.modules[module.__name__] = module  # dataclasses look their module up while the file runs
    try:
        exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


@pytest.fixture
def sglang_eplb() -> Iterator[types.SimpleNamespace]:
    """SGLang's EPLB module, run on one torch thread: its `max(dim=-1)` on tiny rows is 50x slower on two
    busy threads (8 s instead of 0.16 s for the 240 instances below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield types.SimpleNamespace(**sglang_module("srt/eplb/eplb_algorithms/deepseek.py"))
    finally:
        torch.set_num_threads(threads)


# --- (a) our EPLB port == SGLang's ---------------------------------------------------------------------


def random_instances(count: int, seed: int, tied: bool) -> list[tuple[torch.Tensor, int, int, int, int]]:
    """(weight [L, E], replicas, groups, nodes, gpus) with groups % nodes == 0; distinct float loads, or
    (tied) small integer loads with many ties and idle experts."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        nodes, gpus_per_node = int(rng.choice([1, 2, 4])), int(rng.choice([1, 2, 4]))
        gpus, groups = nodes * gpus_per_node, nodes * int(rng.integers(1, 4))
        experts = groups * int(rng.integers(1, 6))
        replicas = gpus * (-(-experts // gpus) + int(rng.integers(0, 3)))
        layers = int(rng.integers(1, 4))
        if tied:
            weight = rng.integers(0, 5, (layers, experts)).astype(np.float32)
        else:
            weight = (rng.random((layers, experts)) * 1000).astype(np.float32)
            assert len(np.unique(weight)) == weight.size
        out.append((torch.from_numpy(weight), replicas, groups, nodes, gpus))
    return out


def assert_same_eplb(ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...], case: str) -> None:
    for name, a, b in zip(("phy2log", "log2phy", "logcnt"), ours, theirs):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), f"{name} differs on {case}"


@needs_sglang
@pytest.mark.parametrize("tied", [False, True], ids=["tie-free", "tied"])
def test_eplb_equals_sglang(sglang_eplb: types.SimpleNamespace, tied: bool) -> None:
    """240 tie-free (120 tied) instances x (hierarchical, global): phy2log, log2phy, logcnt all equal."""
    for weight, replicas, groups, nodes, gpus in random_instances(120 if tied else 240, seed=8 + tied, tied=tied):
        case = f"L,E={tuple(weight.shape)} P={replicas} groups={groups} nodes={nodes} gpus={gpus}"
        assert_same_eplb(rebalance_experts(weight, replicas, groups, nodes, gpus),
                         sglang_eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, True), case)
        assert_same_eplb(rebalance_experts(weight, replicas, 1, 1, gpus),
                         sglang_eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, False), case)


@needs_sglang
def test_eplb_golden_vector_and_global_fallback(sglang_eplb: types.SimpleNamespace) -> None:
    theirs = sglang_eplb.rebalance_experts(GOLDEN_WEIGHT, 16, 4, 2, 8, True)
    assert theirs[0].tolist() == GOLDEN_PHY2LOG and theirs[2].tolist() == GOLDEN_LOGCNT
    assert_same_eplb(rebalance_experts(GOLDEN_WEIGHT, 16, 4, 2, 8), theirs, "the golden vector")
    # 3 groups on 2 nodes: ours falls back to the global policy, as SGLang's `auto` choice does
    assert_same_eplb(rebalance_experts(GOLDEN_WEIGHT, 16, 3, 2, 8),
                     sglang_eplb.rebalance_experts(GOLDEN_WEIGHT, 16, 3, 2, 8, False), "3 groups, 2 nodes")


@needs_sglang
def test_eplb_float64_pack_sums_as_sglang(sglang_eplb: types.SimpleNamespace) -> None:
    """Tie-free loads whose float32 pack totals would round to a tie (see test_eplb)."""
    weight = torch.tensor([[10_000_000.0, 9_000_000, 7_777_216, 6_777_217, 100, 50]])
    assert_same_eplb(rebalance_experts(weight, 6, 1, 1, 2),
                     sglang_eplb.rebalance_experts(weight, 6, 1, 1, 2, False), "near-tied pack totals")


# --- (b) <stem>.sglang.json through SGLang's own loader -------------------------------------------------


def sglang_loader(num_layers: int, num_experts: int, num_redundant: int, ep_size: int,
                  init_expert_location: str, nnodes: int = 1, num_groups: int | None = None) -> dict[str, Any]:
    """srt/eplb/expert_location.py, with server args as the engines block's flags set them (EPLB's
    `--eplb-algorithm` at its default, auto) and a model of `num_groups` expert groups (config n_group)."""
    moe = types.SimpleNamespace(init_expert_location=init_expert_location, ep_num_redundant_experts=num_redundant,
                                ep_dispatch_algorithm="dynamic", moe_a2a_backend="none", ep_join_mode="none",
                                eplb_algorithm="auto")
    parallel = types.SimpleNamespace(ep_size=ep_size, elastic_ep_initial_size=None, nnodes=nnodes)
    scope = sglang_module("srt/eplb/expert_location.py", drop_imports_from="sglang",
                          get_device=lambda: types.SimpleNamespace(device="cpu"),
                          get_exec=lambda: types.SimpleNamespace(moe=moe),
                          get_parallel=lambda: parallel, get_resources=lambda: None)
    model = scope["ModelConfigForExpertLocation"]  # the model lookup needs SGLang's model registry
    model.from_model_config = staticmethod(lambda _: model(num_layers=num_layers, num_logical_experts=num_experts,
                                                           num_groups=num_groups))
    return scope


@pytest.fixture
def sglang_eplb_package(sglang_eplb: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """SGLang's `srt/eplb/eplb_algorithms/__init__.py` (compute_algorithm, rebalance_experts) over its
    deepseek.py, importable as `sglang.srt.eplb.eplb_algorithms` (what init_by_eplb imports) without
    running the package's __init__; the other algorithm modules are not used by `auto`."""
    unused = types.SimpleNamespace()
    scope = sglang_module("srt/eplb/eplb_algorithms/__init__.py", drop_imports_from="sglang",
                          deepseek=sglang_eplb, deepseek_vec=unused, elasticity_aware=unused)
    package = types.ModuleType("sglang.srt.eplb.eplb_algorithms")
    package.__dict__.update(scope)
    for name in ("sglang", "sglang.srt", "sglang.srt.eplb"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["sglang.srt.eplb"], "eplb_algorithms", package, raising=False)
    monkeypatch.setitem(sys.modules, "sglang.srt.eplb.eplb_algorithms", package)
    return scope


@needs_sglang
@pytest.mark.parametrize("n_group,nodes,gpus_per_node,replicas", [
    (1, 2, 4, 0), (1, 2, 4, 1), (8, 2, 4, 1), (8, 4, 2, 0), (4, 8, 1, 0), (None, 2, 4, 1), (2, 1, 8, 1)])
def test_eplb_solver_is_sglangs_init_by_eplb(tmp_path: Path, sglang_eplb_package: dict[str, Any],
                                             n_group: int | None, nodes: int, gpus_per_node: int,
                                             replicas: int) -> None:
    """`solver=eplb` on a trace recording n_group equals what SGLang computes when started with the
    profile's logical count (`--init-expert-location` {"logical_count": ...}, `--eplb-algorithm auto`) on
    `nodes` nodes for a model whose config has that n_group (None: a model without groups, e.g. Qwen3-MoE,
    whose trace records none): SGLang's own compute_algorithm picks hierarchical or global."""
    trace = random_trace(600, 3, 32, 4, seed=11)
    if n_group is not None:
        trace = dataclasses.replace(trace, extra={"n_group": str(n_group)}).validate()
    problem = PlacementProblem(trace, topology(nodes, gpus_per_node), replicas=replicas)
    ours = solve_placement(problem, "eplb", {})
    path = tmp_path / "count.json"
    path.write_text(json.dumps({"logical_count": problem.load.astype(int).tolist()}))
    gpus = nodes * gpus_per_node
    scope = sglang_loader(3, 32, replicas * gpus, gpus, str(path), nnodes=nodes, num_groups=n_group)
    theirs = scope["compute_initial_expert_location_metadata"](object(), moe_ep_rank=0)
    assert theirs.physical_to_logical_map.tolist() == ours.phy2log.tolist()
    algorithm = sglang_eplb_package["compute_algorithm"]("auto", n_group, nodes).name
    assert ours.extra["eplb_policy"] == ("hierarchical" if algorithm == "deepseek_hierarchical" else "global")


def solved_files(tmp_path: Path, solver: str, gpus: int, replicas: int, experts: int = 8) -> list[Path]:
    """write_placement's files for a solver's placement (3 layers, 2 nodes), or for `unfilled`:
    contiguous with its `replicas` extra slots per GPU left empty (-1)."""
    if solver == "unfilled":
        slots = -(-experts // gpus) + replicas
        placement = Placement(contiguous_phy2log(3, experts, gpus, slots), num_gpus=gpus, num_nodes=2,
                              solver=solver)
    else:
        problem = PlacementProblem(random_trace(120, 3, experts, 2), topology(2, gpus // 2), replicas=replicas)
        placement = solve_placement(problem, solver, {})
    return write_placement(placement, experts, tmp_path / f"{solver}.json")


@needs_sglang
@pytest.mark.parametrize("solver,gpus,replicas", [("eplb", 4, 1), ("contiguous", 4, 0), ("round_robin", 4, 2),
                                                  ("greedy", 6, 1), ("unfilled", 4, 1)])
def test_sglang_file_loads_in_sglang(tmp_path: Path, solver: str, gpus: int, replicas: int) -> None:
    out, _, torch_file, sglang_file = solved_files(tmp_path, solver, gpus, replicas)
    doc, data = json.loads(out.read_text()), json.loads(sglang_file.read_text())
    assert list(data) == ["physical_to_logical_map"]
    flags = doc["engines"]["sglang"]["flags"]
    value = dict(zip(flags[::2], flags[1::2]))
    assert value["--init-expert-location"] == str(sglang_file) and int(value["--ep-size"]) == gpus
    scope = sglang_loader(3, 8, int(value["--ep-num-redundant-experts"]), gpus, str(sglang_file))

    signature = inspect.signature(scope["ExpertLocationMetadata"].init_by_mapping)
    signature.bind(object(), **data, moe_ep_rank=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_gpus'"):
        signature.bind(object(), **doc, moe_ep_rank=0)  # our own JSON is not an SGLang file
    with pytest.raises(TypeError, match="unexpected keyword argument 'logical_to_physical_map'"):
        signature.bind(object(), **torch.load(torch_file, weights_only=True), moe_ep_rank=0)

    metadata = scope["compute_initial_expert_location_metadata"](object(), moe_ep_rank=0)
    phy2log = np.asarray(doc["physical_to_logical_map"])
    filled = np.asarray(data["physical_to_logical_map"])
    assert (filled >= 0).all() and (filled == phy2log)[phy2log >= 0].all()  # only empty slots change
    assert metadata.physical_to_logical_map.tolist() == filled.tolist()
    assert metadata.num_physical_experts == filled.shape[1]
    assert metadata.num_local_physical_experts == filled.shape[1] // gpus  # SGLang's slot -> GPU is ours
    ours, theirs = logical_to_physical_map(filled, 8), metadata.logical_to_all_physical_map.numpy()
    width = ours.shape[2]  # SGLang pads to P columns
    assert np.array_equal(theirs[:, :, :width], ours) and (theirs[:, :, width:] == -1).all()
    load = np.random.default_rng(0).random((3, 8))
    assert np.allclose(gpu_loads(filled, load, gpus), gpu_loads(phy2log, load, gpus))  # fills kept the loads


@needs_sglang
def test_sglang_reads_an_empty_slot_as_the_last_expert(tmp_path: Path) -> None:
    """Why empty slots are filled: SGLang indexes its per-expert lists with the -1 (python's last item)."""
    phy2log = contiguous_phy2log(1, 3, 2, 2)  # [[0, 1, 2, -1]]
    path = tmp_path / "raw.json"
    path.write_text(json.dumps({"physical_to_logical_map": phy2log.tolist()}))
    metadata = sglang_loader(1, 3, 1, 2, str(path))["compute_initial_expert_location_metadata"](object(), 0)
    assert metadata.logical_to_all_physical_map[0, 2, :2].tolist() == [2, 3]  # slot 3 taken for expert 2


@needs_sglang
def test_engine_flags_are_sglang_options() -> None:
    """Every SGLang flag we print is a server argument of 0.5.23, every dispatch one it accepts."""
    fields: dict[str, ast.expr] = {}
    for path in (SGLANG_ROOT / "srt/arg_groups/fields").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                fields[node.target.id] = node.annotation
    placement = Placement(phy2log=np.zeros((1, 8), dtype=np.int64), num_gpus=4, num_nodes=2, solver="x")
    flags = engine_settings(placement, 1, "x.sglang.json")["sglang"]["flags"]
    for flag in flags[::2]:
        assert flag.startswith("--") and flag[2:].replace("-", "_") in fields, flag
    accepted = {node.value for node in ast.walk(fields["ep_dispatch_algorithm"])
                if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert {"static", "dynamic", "lp"} <= accepted and set(SGLANG_DISPATCH.values()) <= accepted


# --- the engines block and the fill, no SGLang needed ---------------------------------------------------


@pytest.mark.parametrize("dispatch,algorithm,notes", [("dynamic", "dynamic", 1), ("static", "static", 2),
                                                      ("lp", "lp", 2), ("lp_comm", "lp", 3), (None, "dynamic", 1)])
def test_engine_settings(dispatch: str | None, algorithm: str, notes: int) -> None:
    assert set(SGLANG_DISPATCH) == set(DISPATCHES)
    extra = {} if dispatch is None else {"dispatch": dispatch}  # placements solved before `dispatch` existed
    placement = Placement(phy2log=np.zeros((2, 18), dtype=np.int64), num_gpus=6, num_nodes=2, solver="x",
                          extra=extra)
    engines = engine_settings(placement, 16, "p.sglang.json", ("p.vllm.json", "p.pt"))
    sglang = engines["sglang"]
    assert sglang["flags"] == ["--tp-size", "6", "--ep-size", "6", "--nnodes", "2", "--init-expert-location",
                               "p.sglang.json", "--ep-num-redundant-experts", "2", "--ep-dispatch-algorithm",
                               algorithm]  # 18 slots - 16 experts, not G * replicas
    assert len(sglang["notes"]) == notes and engines["dispatch"] == (dispatch or "dynamic")
    assert engines["vllm"]["flags"][-1] == '{"num_redundant_experts": 2}'
    with pytest.raises(PlacementError, match="dispatch='nope' is unknown"):
        engine_settings(Placement(placement.phy2log, 6, 2, "x", extra={"dispatch": "nope"}), 16, "p")


def test_fill_empty_slots_by_hand() -> None:
    # G=2, S=3: each GPU's experts sit only there, so the fill keeps every GPU's load
    filled, changed = fill_empty_slots(np.array([[0, 1, -1, 2, 3, -1]]), 2)
    assert filled.tolist() == [[0, 1, 0, 2, 3, 2]] and changed == 0
    # expert 1 is on both GPUs, expert 0 only on GPU 0: GPU 0's empty slot copies 0
    filled, changed = fill_empty_slots(np.array([[1, 0, -1, 1, 2, 3]]), 2)
    assert filled.tolist() == [[1, 0, 0, 1, 2, 3]] and changed == 0
    # no expert of GPU 0 is only there: a copy shifts load (counted); an empty GPU copies the most copied
    filled, changed = fill_empty_slots(np.array([[0, 1, -1, 0, 1, 2], [-1, -1, -1, 0, 1, 1]]), 2)
    assert filled.tolist() == [[0, 1, 0, 0, 1, 2], [1, 1, 1, 0, 1, 1]] and changed == 4
