"""Conformance with a real engine's own code: SGLang 0.5.23, its wheel installed without dependencies.

- Our EPLB port against SGLang's copy of DeepSeek's (`srt/eplb/eplb_algorithms/deepseek.py`, which needs
  torch alone; loaded from its file, as `import sglang` runs the package's `__init__`, which needs
  SGLang's other dependencies and patches transformers).
- Our `<stem>.sglang.json` through SGLang's own `--init-expert-location` loader
  (`srt/eplb/expert_location.py`). That module imports `sglang.srt.runtime_context`, i.e. the whole
  package, so it is compiled from the installed source with its four runtime getters and the model
  lookup stubbed; everything else (file reading, `init_by_mapping(model_config, **data, moe_ep_rank=...)`,
  the logical-to-physical maps) is SGLang's code as shipped.
- Our SGLang file at the real layouts: DeepSeek-V2-Lite (27 decoder layers, layer 0 dense) and a
  DeepSeek-V3-shaped model (61 layers, 3 dense), through the loader and then SGLang's per-layer dispatch
  lookup (`srt/eplb/expert_location_dispatch.py`, `ExpertLocationDispatchInfo.init_new(layer_id)`).
- vLLM and TensorRT-LLM are not installed (vLLM's wheel is 336 MB; both import their whole runtime), so
  their files are checked against their loaders' rules as written (`vllm_initial_mapping`,
  `trtllm_assignments` below, each rule with its source line; docs/engines.md).

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from moetuner.costmodel.settings import DISPATCHES
from moetuner.engines import (SGLANG_DISPATCH, EngineFileError, engine_settings, export_engine_files,
                              fill_empty_slots, read_engine_file, write_placement)
from moetuner.model_layout import ModelLayout, layout_from_config_dict
from moetuner.placement import Placement, PlacementError, contiguous_phy2log, gpu_loads, logical_to_physical_map
from moetuner.solvers.eplb import rebalance_experts
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
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


# --- (b) engine files on real model layouts ------------------------------------------------------------

# config.json fields of deepseek-ai/DeepSeek-V2-Lite and deepseek-ai/DeepSeek-V3 (Hugging Face model repos)
V2_LITE = {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "num_hidden_layers": 27,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 64, "n_group": 1}
V3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61,
      "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_routed_experts": 256, "n_group": 8}
MODELS = {"v2-lite": (V2_LITE, 1), "v3": (V3, 3)}  # config, dense layers in front
EP = 8


def random_placement(layers: int, experts: int, gpus: int, redundant: int, seed: int = 0) -> Placement:
    """Every expert once plus `redundant` random copies per layer, slots shuffled. [L, E + R]"""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, redundant)]))
            for _ in range(layers)]
    return Placement(np.asarray(rows, dtype=np.int64), num_gpus=gpus, num_nodes=1, solver="random")


def exported(tmp_path: Path, model: str) -> tuple[ModelLayout, Placement, dict[str, Path], dict[str, Any]]:
    config, _ = MODELS[model]
    layout = layout_from_config_dict(config, model)
    placement = random_placement(len(layout.moe_layers), layout.num_experts, EP, EP)
    files, block = export_engine_files(placement, layout.num_experts, layout, tmp_path / "p")
    return layout, placement, files, block


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


def sglang_metadata(path: Path, num_layers: int, num_experts: int, ep_size: int = EP) -> Any:
    """SGLang's ExpertLocationMetadata of an --init-expert-location file, at `num_layers` decoder layers."""
    redundant = len(json.loads(path.read_text())["physical_to_logical_map"][0]) - num_experts
    scope = sglang_loader(num_layers, num_experts, redundant, ep_size, str(path))
    return scope["compute_initial_expert_location_metadata"](object(), moe_ep_rank=0)


def sglang_dispatch_info(metadata: Any, layer_id: int) -> Any:
    """srt/eplb/expert_location_dispatch.py: the per-layer lookup every MoE layer makes by decoder index."""
    moe = types.SimpleNamespace(ep_dispatch_algorithm="dynamic", moe_a2a_backend="none")
    scope = sglang_module("srt/eplb/expert_location_dispatch.py", drop_imports_from="sglang",
                          get_global_expert_location_metadata=lambda: metadata,
                          get_exec=lambda: types.SimpleNamespace(moe=moe))
    return scope["ExpertLocationDispatchInfo"].init_new(layer_id)


@needs_sglang
@pytest.mark.parametrize("model", sorted(MODELS))
def test_sglang_loads_the_file_at_the_real_layer_count(tmp_path: Path, model: str) -> None:
    layout, placement, files, block = exported(tmp_path, model)
    dense = MODELS[model][1]
    assert layout.moe_layers == tuple(range(dense, layout.num_hidden_layers))
    flags = block["sglang"]["flags"]
    value = dict(zip(flags[::2], flags[1::2]))
    assert value["--init-expert-location"] == str(files["sglang"]) and value["--ep-num-redundant-experts"] == str(EP)
    metadata = sglang_metadata(files["sglang"], layout.num_hidden_layers, layout.num_experts)
    served = metadata.physical_to_logical_map.numpy()
    assert served.shape == (layout.num_hidden_layers, layout.num_experts + EP)
    assert np.array_equal(served[dense:], placement.phy2log)
    assert (served[:dense] == np.arange(layout.num_experts + EP) % layout.num_experts).all()
    for layer in (dense, layout.num_hidden_layers - 1):  # the first and last MoE layer, by decoder index
        info = sglang_dispatch_info(metadata, layer)
        row = placement.phy2log[layer - dense]
        for expert in (0, layout.num_experts - 1):
            valid = int(info.partial_logical_to_all_physical_map_num_valid[expert])
            assert sorted(info.partial_logical_to_all_physical_map[expert, :valid].tolist()) == \
                np.flatnonzero(row == expert).tolist()


@needs_sglang
def test_a_map_of_moe_rows_only_fails_in_sglang_and_in_our_reader(tmp_path: Path) -> None:
    """The file shape before model layouts: 26 MoE rows for V2-Lite's 27 decoder layers. SGLang's loader takes
    it; its dispatch lookup for the last MoE layer (decoder index 26) then indexes past the map."""
    layout, placement, _, _ = exported(tmp_path, "v2-lite")
    short = tmp_path / "short.sglang.json"
    short.write_text(json.dumps({"physical_to_logical_map": placement.phy2log.tolist()}))
    metadata = sglang_metadata(short, layout.num_hidden_layers, layout.num_experts)
    assert metadata.physical_to_logical_map.shape[0] == 26  # no row-count check in the loader
    with pytest.raises(IndexError):
        sglang_dispatch_info(metadata, 26)
    with pytest.raises(EngineFileError, match="expected 27 rows"):
        read_engine_file("sglang", short, layout, layout.num_experts)


def test_the_worked_example_of_the_engine_formats() -> None:
    """4 decoder layers, layer 0 dense, E=8, ep=2, R=2 (docs/engines.md): the three files, by hand."""
    layout = ModelLayout(num_hidden_layers=4, moe_layers=(1, 2, 3), num_experts=8)
    rows = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1], [2, 0, 4, 6, 1, 3, 5, 7, 2, 6], [7, 6, 5, 4, 3, 2, 1, 0, 7, 3]])
    from moetuner.engines import sglang_document, trtllm_document, vllm_record
    assert sglang_document(rows, layout, 8) == {"physical_to_logical_map": [
        [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], [2, 0, 4, 6, 1, 3, 5, 7, 2, 6],
        [7, 6, 5, 4, 3, 2, 1, 0, 7, 3]]}
    assert vllm_record(rows, 8) == {
        "record_type": "eplb_initial_mapping", "version": 1, "num_redundant_experts": 2, "num_slots": 10,
        "initial_global_assignments": {"0": [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], "1": [2, 0, 4, 6, 1, 3, 5, 7, 2, 6],
                                       "2": [7, 6, 5, 4, 3, 2, 1, 0, 7, 3]}}
    assert trtllm_document(rows, layout) == {"num_slots": 10, "layer_updates_per_iter": 0, "initial_global_assignments": {
        1: [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], 2: [2, 0, 4, 6, 1, 3, 5, 7, 2, 6], 3: [7, 6, 5, 4, 3, 2, 1, 0, 7, 3]}}


# --- vLLM and TensorRT-LLM: their loaders' rules as written ----------------------------------------------


def vllm_initial_mapping(path: Path, num_moe_layers: int, num_logical: int, num_redundant: int) -> list[list[int]]:
    """vLLM PR #41141 `EplbState._load_initial_mapping` (vllm/distributed/eplb/eplb_state.py @63727bfc): the last
    `eplb_initial_mapping` line; ValueError on each rule it checks; extra keys are ignored."""
    record = None
    for line in path.read_text().splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON: {err}") from err
        if doc.get("record_type") == "eplb_initial_mapping":
            record = doc
    if record is None:
        raise ValueError("no eplb_initial_mapping record")
    if record.get("version") != 1:
        raise ValueError("version")
    if record.get("num_redundant_experts") != num_redundant:
        raise ValueError("num_redundant_experts differs from the EPLB config")
    num_physical = num_logical + num_redundant
    if record.get("num_slots") != num_physical:
        raise ValueError("num_slots differs from the model's physical expert count")
    assignments = record.get("initial_global_assignments")
    if not isinstance(assignments, dict):
        raise ValueError("initial_global_assignments is not a dict")
    rows = []
    for layer in range(num_moe_layers):
        if str(layer) not in assignments:
            raise ValueError(f"missing layer {layer}")
        row = assignments[str(layer)]
        if not isinstance(row, list) or len(row) != num_physical:
            raise ValueError(f"layer {layer}: not a list of num_slots ints")
        if not all(isinstance(x, int) and 0 <= x < num_logical for x in row):
            raise ValueError(f"layer {layer}: id not an int in [0, num_logical)")
        if len(set(row)) != num_logical:
            raise ValueError(f"layer {layer}: does not cover every logical expert")
        if max(row.count(x) for x in set(row)) > 1024:
            raise ValueError(f"layer {layer}: more than 1024 replicas")
        rows.append(row)
    return rows


TRTLLM_FIELDS = ("num_slots", "initial_global_assignments", "layer_updates_per_iter")


def trtllm_assignments(path: Path, moe_layers: Sequence[int], ep_size: int, num_experts: int) -> list[list[int]]:
    """TensorRT-LLM's reading of moe_config.load_balancer: `MoeLoadBalancerConfig` is a StrictBaseModel (extra
    keys rejected; llmapi/llm_args.py @00043967); `setup()` needs num_slots % ep_size == 0; the per-layer lookup
    (KeyError for a missing decoder layer, ValueError for a wrong length) and the MoE module's asserts
    (`_torch/modules/fused_moe/fused_moe_wide_ep.py` @01303b38): a list of num_slots >= E ids covering range(E)."""
    doc = yaml.safe_load(path.read_text())
    if set(doc) - set(TRTLLM_FIELDS):
        raise ValueError(f"extra fields {sorted(set(doc) - set(TRTLLM_FIELDS))} not permitted")
    num_slots = doc.get("num_slots")
    if num_slots is None or num_slots % ep_size:
        raise ValueError("num_slots must be set and divisible by ep_size")
    rows = []
    for layer in moe_layers:
        row = doc["initial_global_assignments"][layer]  # KeyError for a missing layer
        if len(row) != num_slots:
            raise ValueError(f"layer {layer}: length differs from num_slots")
        assert isinstance(row, list) and len(row) == num_slots and num_slots >= num_experts
        assert set(row) == set(range(num_experts)), f"layer {layer}: not every expert, or ids out of range"
        rows.append(row)
    return rows


def engine_reads(engine: str, path: Path, layout: ModelLayout, block: dict[str, Any]) -> list[list[int]]:
    """The engine's own reading of its file (SGLang: its loader; vLLM, TensorRT-LLM: their rules), MoE rows."""
    experts = layout.num_experts
    if engine == "sglang":
        metadata = sglang_metadata(path, layout.num_hidden_layers, experts)
        return metadata.physical_to_logical_map[list(layout.moe_layers)].tolist()
    if engine == "vllm":
        config = json.loads(block["vllm"]["flags"][-1])
        assert config["initial_mapping_path"] == str(path) and config["disable_online_rebalancing"] is True
        return vllm_initial_mapping(path, len(layout.moe_layers), experts, config["num_redundant_experts"])
    flags = block["trtllm"]["flags"]
    options = yaml.safe_load(Path(flags[flags.index("--extra_llm_api_options") + 1]).read_text())
    assert options == {"moe_config": {"load_balancer": str(path)}}
    return trtllm_assignments(path, layout.moe_layers, int(flags[flags.index("--ep_size") + 1]), experts)


ENGINE_NAMES = ("sglang", "vllm", "trtllm")


def engine_param(engine: str) -> Any:
    return pytest.param(engine, marks=needs_sglang) if engine == "sglang" else engine


@pytest.mark.parametrize("engine", [engine_param(e) for e in ENGINE_NAMES])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_file_decodes_to_the_placement(tmp_path: Path, model: str, engine: str) -> None:
    layout, placement, files, block = exported(tmp_path, model)
    assert engine_reads(engine, files[engine], layout, block) == placement.phy2log.tolist()
    assert np.array_equal(read_engine_file(engine, files[engine], layout, layout.num_experts), placement.phy2log)


def rewrite(engine: str, path: Path, change: Any) -> None:
    """Apply `change` to the file's document (vLLM: its record) and write it back."""
    if engine == "trtllm":
        doc = yaml.safe_load(path.read_text())
        change(doc)
        path.write_text(yaml.safe_dump(doc))
    else:
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))


def rows_of(engine: str, doc: dict[str, Any]) -> Any:
    return doc["physical_to_logical_map"] if engine == "sglang" else doc["initial_global_assignments"]


def shift_keys(engine: str, doc: dict[str, Any]) -> None:
    """Move every MoE row one layer down: SGLang rows 1..26 to 0..25 (a trivial row last), keys k to k - 1."""
    rows = rows_of(engine, doc)
    if engine == "sglang":
        doc["physical_to_logical_map"] = rows[1:] + [rows[0]]
    elif engine == "vllm":
        doc["initial_global_assignments"] = {str(int(k) + 1): v for k, v in rows.items()}
    else:
        doc["initial_global_assignments"] = {int(k) - 1: v for k, v in rows.items()}


def last_moe_key(engine: str, doc: dict[str, Any]) -> Any:
    rows = rows_of(engine, doc)
    return len(rows) - 1 if engine == "sglang" else max(rows, key=int)


def uncover(engine: str, doc: dict[str, Any]) -> None:
    """Expert 0 of the last MoE layer loses every slot (to expert 1)."""
    row = rows_of(engine, doc)[last_moe_key(engine, doc)]
    row[:] = [1 if x == 0 else x for x in row]


def out_of_range(engine: str, doc: dict[str, Any]) -> None:
    rows_of(engine, doc)[last_moe_key(engine, doc)][0] = 64


def missing_layer(engine: str, doc: dict[str, Any]) -> None:
    rows = rows_of(engine, doc)
    if engine == "sglang":
        rows.pop()
    else:
        del rows[last_moe_key(engine, doc)]


def extra_key(engine: str, doc: dict[str, Any]) -> None:
    doc["num_layers" if engine == "sglang" else "note"] = 27


DEFECTS = {"shifted": shift_keys, "uncovered": uncover, "out_of_range": out_of_range, "missing_layer": missing_layer,
           "extra_key": extra_key}
ENGINE_REFUSES = {  # defect -> engines whose own reading raises (the rest take the file silently)
    "shifted": {"vllm": ValueError, "trtllm": KeyError},
    "uncovered": {"vllm": ValueError, "trtllm": AssertionError},
    "out_of_range": {"sglang": IndexError, "vllm": ValueError, "trtllm": AssertionError},
    "missing_layer": {"vllm": ValueError, "trtllm": KeyError},
    "extra_key": {"sglang": TypeError, "trtllm": ValueError},
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("engine", [engine_param(e) for e in ENGINE_NAMES])
def test_defective_files_are_refused(tmp_path: Path, engine: str, defect: str) -> None:
    """Our reader refuses every defect; the engine itself only some (ENGINE_REFUSES), which is why the
    exporter validates: SGLang's loader takes a shifted, short or uncovered map without a word."""
    layout, _, files, block = exported(tmp_path, "v2-lite")
    rewrite(engine, files[engine], lambda doc: DEFECTS[defect](engine, doc))
    with pytest.raises(EngineFileError):
        read_engine_file(engine, files[engine], layout, layout.num_experts)
    refuses = ENGINE_REFUSES[defect].get(engine)
    if refuses is not None:
        with pytest.raises(refuses):
            engine_reads(engine, files[engine], layout, block)
    elif engine == "sglang":
        sglang_metadata(files[engine], layout.num_hidden_layers, layout.num_experts)  # SGLang's loader takes it
    else:
        engine_reads(engine, files[engine], layout, block)  # the engine takes it silently


def test_export_refuses_a_placement_an_engine_would_misread(tmp_path: Path) -> None:
    layout = layout_from_config_dict(V2_LITE)
    placement = random_placement(26, 64, EP, EP)
    placement.phy2log[3][placement.phy2log[3] == 5] = 6  # expert 5 of MoE layer 3 has no slot
    with pytest.raises(PlacementError, match="expert 5 of layer 3 has no slot"):
        export_engine_files(placement, 64, layout, tmp_path / "p")
    with pytest.raises(Exception, match="has 26 MoE layers but v3 has 58"):
        export_engine_files(random_placement(26, 64, EP, EP), 64, layout_from_config_dict(V3, "v3"), tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


@needs_sglang
def test_engine_flags_are_sglang_options(tmp_path: Path) -> None:
    """Every SGLang flag we print is a server argument of 0.5.23, every dispatch one it accepts."""
    fields: dict[str, ast.expr] = {}
    for path in (SGLANG_ROOT / "srt/arg_groups/fields").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                fields[node.target.id] = node.annotation
    flags = exported(tmp_path, "v2-lite")[3]["sglang"]["flags"]
    for flag in flags[::2]:
        assert flag.startswith("--") and flag[2:].replace("-", "_") in fields, flag
    accepted = {node.value for node in ast.walk(fields["ep_dispatch_algorithm"])
                if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert {"static", "dynamic", "lp"} <= accepted and set(SGLANG_DISPATCH.values()) <= accepted


@needs_sglang
@pytest.mark.parametrize("solver,gpus,replicas", [("eplb", 4, 1), ("contiguous", 4, 0), ("round_robin", 4, 2),
                                                  ("greedy", 6, 1), ("unfilled", 4, 1)])
def test_solved_placements_load_in_sglang(tmp_path: Path, solver: str, gpus: int, replicas: int) -> None:
    """write_placement's SGLang file of each solver (4 decoder layers, layer 0 dense) through SGLang's loader:
    only empty slots change, and the fills keep every GPU's load."""
    trace = random_trace(120, 3, 8, 2)
    trace = dataclasses.replace(trace, moe_layers=[1, 2, 3], extra={"num_hidden_layers": "4"})
    if solver == "unfilled":
        placement = Placement(contiguous_phy2log(3, 8, gpus, -(-8 // gpus) + replicas), num_gpus=gpus, num_nodes=2,
                              solver=solver, extra={"num_hidden_layers": 4, "moe_layers": [1, 2, 3]})
    else:
        placement = solve_placement(PlacementProblem(trace, topology(2, gpus // 2), replicas=replicas), solver, {})
    out, sglang_file, *_ = write_placement(placement, 8, tmp_path / f"{solver}.json")
    doc = json.loads(out.read_text())
    flags = doc["engines"]["sglang"]["flags"]
    scope = sglang_loader(4, 8, int(dict(zip(flags[::2], flags[1::2]))["--ep-num-redundant-experts"]), gpus,
                          str(sglang_file))
    signature = inspect.signature(scope["ExpertLocationMetadata"].init_by_mapping)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_gpus'"):
        signature.bind(object(), **doc, moe_ep_rank=0)  # our own JSON is not an SGLang file
    metadata = scope["compute_initial_expert_location_metadata"](object(), moe_ep_rank=0)
    phy2log = np.asarray(doc["physical_to_logical_map"])
    filled = metadata.physical_to_logical_map.numpy()[1:]
    assert (filled >= 0).all() and (filled == phy2log)[phy2log >= 0].all()  # only empty slots change
    assert metadata.num_local_physical_experts == filled.shape[1] // gpus  # SGLang's slot -> GPU is ours
    ours, theirs = logical_to_physical_map(filled, 8), metadata.logical_to_all_physical_map.numpy()[1:]
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


# --- the engines block, warnings and the fill, no SGLang needed ------------------------------------------


@pytest.mark.parametrize("dispatch,algorithm,notes", [("dynamic", "dynamic", 1), ("static", "static", 2),
                                                      ("lp", "lp", 2), ("lp_comm", "lp", 3), (None, "dynamic", 1)])
def test_engine_settings(dispatch: str | None, algorithm: str, notes: int) -> None:
    assert set(SGLANG_DISPATCH) == set(DISPATCHES)
    extra = {} if dispatch is None else {"dispatch": dispatch}  # placements solved before `dispatch` existed
    placement = Placement(phy2log=np.zeros((2, 18), dtype=np.int64), num_gpus=6, num_nodes=2, solver="x",
                          extra=extra)
    layout = ModelLayout(num_hidden_layers=3, moe_layers=(1, 2))
    files = {"sglang": "p.sglang.json", "vllm": "p.vllm.jsonl", "trtllm": "p.trtllm.yaml",
             "trtllm_options": "p.trtllm-options.yaml"}
    engines = engine_settings(placement, 16, files, layout)
    sglang = engines["sglang"]
    assert sglang["flags"] == ["--tp-size", "6", "--ep-size", "6", "--nnodes", "2", "--init-expert-location",
                               "p.sglang.json", "--ep-num-redundant-experts", "2", "--ep-dispatch-algorithm",
                               algorithm]  # 18 slots - 16 experts, not G * replicas
    assert len(sglang["notes"]) == notes and engines["dispatch"] == (dispatch or "dynamic")
    assert json.loads(engines["vllm"]["flags"][-1]) == {"num_redundant_experts": 2, "initial_mapping_path":
                                                        "p.vllm.jsonl", "disable_online_rebalancing": True}
    assert engines["trtllm"]["flags"] == ["--tp_size", "6", "--ep_size", "6", "--extra_llm_api_options",
                                          "p.trtllm-options.yaml"]
    with pytest.raises(PlacementError, match="dispatch='nope' is unknown"):
        engine_settings(Placement(placement.phy2log, 6, 2, "x", extra={"dispatch": "nope"}), 16, files, layout)


@pytest.mark.parametrize("config,ep,ignored", [(V2_LITE, 8, ["trtllm"]), (V3, 8, []), (V3, 1, ["trtllm"]),
                                               ({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"],
                                                 "num_hidden_layers": 16, "num_experts": 64}, 8, ["sglang", "trtllm"])])
def test_warnings_where_an_engine_ignores_its_file(config: dict, ep: int, ignored: list[str]) -> None:
    from moetuner.engines import engine_warnings
    warnings = engine_warnings(layout_from_config_dict(config), ep)
    assert sorted(e for e in ("sglang", "trtllm") if warnings[e]) == ignored
    assert "PR #41141" in warnings["vllm"][0]  # every vLLM release lacks the loader


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


# --- the aim: the shipped DeepSeek-V2-Lite traces, solved, in every engine ----------------------------------


@pytest.fixture(scope="module")
def shipped_v2_lite(tmp_path_factory: pytest.TempPathFactory) -> tuple[Placement, dict[str, Any], ModelLayout]:
    """moetuner-solve's path (solve_placement, write_placement) on data/esft/intent.safetensors, 8 GPUs,
    one redundant slot per GPU; the layout comes from the trace's own record (27 layers, layer 0 dense)."""
    from moetuner import PROJECT_ROOT
    from moetuner.trace import load_trace

    trace = load_trace(PROJECT_ROOT / "data" / "esft" / "intent.safetensors")
    placement = solve_placement(PlacementProblem(trace, topology(1, EP), replicas=1), "eplb", {})
    out = write_placement(placement, 64, tmp_path_factory.mktemp("shipped") / "eplb.json")[0]
    return placement, json.loads(out.read_text())["engines"], layout_from_config_dict(V2_LITE)


@pytest.mark.parametrize("engine", [engine_param(e) for e in ENGINE_NAMES])
def test_a_shipped_trace_placement_passes_every_engine_rule(shipped_v2_lite: tuple, engine: str) -> None:
    placement, block, layout = shipped_v2_lite
    assert (block["num_hidden_layers"], block["moe_layers"]) == (27, list(range(1, 27)))
    path = Path(block[engine]["file"])
    assert engine_reads(engine, path, layout, block) == placement.phy2log.tolist()
    assert np.array_equal(read_engine_file(engine, path, layout, 64), placement.phy2log)
