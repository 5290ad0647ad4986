"""Engine load dumps -> load profiles -> placements -> that engine's file.

Each dump is built here in the structure its engine writes (docs/engines.md, "Load dumps"), for one tiny
model: 4 decoder layers, layer 0 dense, 4 experts in 6 physical slots (2 GPUs of 3 slots), 2 steps.
The expected logical counts are summed by hand from the slot counts through the slot map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

from moetuner.engines import read_engine_file, write_placement
from moetuner.importers import RoutingImportError, import_loads
from moetuner.load_profile import LoadProfile, load_load_profile, save_load_profile
from moetuner.model_layout import read_model_config
from moetuner.profiling.stats import expert_load
from moetuner.solvers.problem import PlacementProblem, ProblemError
from moetuner.solvers.registry import LOAD_ONLY_SOLVERS, solve_placement
from test_solvers import random_trace, topology

CONFIG = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 4,
          "first_k_dense_replace": 1, "n_routed_experts": 4, "n_group": 2}
# slot -> expert per decoder layer (layer 0 dense: SGLang's trivial row)
MAP = [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 2, 1], [1, 1, 0, 2, 3, 3]]
# tokens per slot: step, decoder layer, slot (layer 0 dense: nothing)
SLOTS = [[[0] * 6, [5, 1, 0, 2, 3, 1], [4, 0, 2, 6, 1, 1], [2, 2, 3, 1, 0, 4]],
         [[0] * 6, [0, 2, 7, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 3, 0, 0, 2, 2]]]
# the same per expert, summed by hand through MAP, MoE layers 1..3
EXPERTS = [[[8, 2, 0, 2], [6, 3, 1, 4], [3, 4, 1, 4]],
           [[1, 3, 7, 1], [1, 2, 2, 1], [0, 3, 0, 4]]]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def test_the_hand_sums() -> None:
    """EXPERTS really is SLOTS through MAP (a plain loop, independent of the importer's einsum)."""
    for step in range(2):
        for layer in (1, 2, 3):
            sums = [0] * 4
            for slot, expert in enumerate(MAP[layer]):
                sums[expert] += SLOTS[step][layer][slot]
            assert sums == EXPERTS[step][layer - 1]


def sglang_stat(tmp_path: Path) -> Path:
    """`_StatAccumulator.dump`: logical_count int32 [buffer, num_hidden_layers, E], unfilled rows 0."""
    counts = torch.zeros(5, 4, 4, dtype=torch.int32)
    counts[1, 1:] = torch.tensor(EXPERTS[0])  # a circular buffer: filled rows anywhere
    counts[3, 1:] = torch.tensor(EXPERTS[1])
    path = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path)
    return path


def sglang_per_pass(tmp_path: Path) -> Path:
    """`_DetailAccumulator.dump` per rank: records of global_physical_count [layers, P] (each rank's share:
    here its own slots, as the layer-based gatherers write), last_physical_to_logical_map [layers, P]."""
    folder = tmp_path / "per_pass"
    folder.mkdir()
    for rank in range(2):
        records = []
        for step in range(2):
            mine = torch.zeros(4, 6, dtype=torch.int64)
            mine[:, 3 * rank:3 * rank + 3] = torch.tensor(SLOTS[step])[:, 3 * rank:3 * rank + 3]
            records.append({"forward_pass_id": 7 + step, "rank": rank, "gatherer_key": "primary",
                            "global_physical_count": mine})
        torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(MAP)},
                   folder / f"expert_distribution_recorder_1700000000.0_{rank}.pt")
    return folder


def vllm_load_stats(tmp_path: Path) -> Path:
    """PR #41141 `_write_expert_load_stats`: one eplb_load_stats line per step, MoE-layer ordinals; another
    model's line and a mapping record in the same file."""
    lines = [{"record_type": "eplb_initial_mapping", "version": 1, "num_redundant_experts": 2, "num_slots": 6,
              "initial_global_assignments": {str(i): MAP[i + 1] for i in range(3)}}]
    for step in range(2):
        lines.append({"record_type": "eplb_load_stats", "version": 1, "model": "m", "step": 2250 + step,
                      "next_rearrange": 10, "num_ranks": 2, "num_layers": 3, "experts_per_rank": [[0, 2], [3, 1]],
                      "tokens": [[5, 5]] * 3, "expert_load": [SLOTS[step][i] for i in (1, 2, 3)],
                      "p2l_map": MAP[1:]})
    lines.append({**lines[1], "model": "drafter", "expert_load": [[9] * 6] * 3})
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def trtllm_statistic(tmp_path: Path, balancer: bool = True) -> Path:
    """`ExpertStatistic` files: meta_info.json and rank{r}.safetensors of "{iter}_{layer}" int64 bincounts
    (over slots with the balancer on, counted under its initial_global_assignments), each count split
    over two ranks; beside it the balancer's YAML."""
    folder = tmp_path / "stats"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 6 if balancer else 4,
                                                       "num_experts_per_token": 2}))
    counts = {f"{iteration}_{layer}": np.asarray(SLOTS[step][layer] if balancer else EXPERTS[step][layer - 1],
                                                  dtype=np.int64)
              for step, iteration in enumerate((10, 11)) for layer in (1, 2, 3)}
    save_file({k: v - v // 2 for k, v in counts.items()}, str(folder / "rank0.safetensors"))
    save_file({k: v // 2 for k, v in counts.items()}, str(folder / "rank1.safetensors"))
    (tmp_path / "balancer.yaml").write_text(yaml.safe_dump(
        {"num_slots": 6, "layer_updates_per_iter": 0, "initial_global_assignments": {i: MAP[i] for i in (1, 2, 3)}}))
    return folder


DUMPS = {"sglang_stat": sglang_stat, "sglang_per_pass": sglang_per_pass, "vllm_load_stats": vllm_load_stats,
         "trtllm_statistic": trtllm_statistic}
ENGINE_OF = {"sglang_stat": "sglang", "sglang_per_pass": "sglang", "vllm_load_stats": "vllm",
             "trtllm_statistic": "trtllm"}


def imported(fmt: str, tmp_path: Path, config: Path) -> LoadProfile:
    path = DUMPS[fmt](tmp_path)
    extra = {"load_balancer": tmp_path / "balancer.yaml"} if fmt == "trtllm_statistic" else {}
    return import_loads(fmt, path, model="m", model_config=config, **extra)


@pytest.mark.parametrize("fmt", sorted(DUMPS))
def test_dump_imports_into_the_hand_counted_profile(tmp_path: Path, config: Path, fmt: str) -> None:
    profile = imported(fmt, tmp_path, config)
    assert profile.counts.tolist() == EXPERTS and profile.moe_layers == [1, 2, 3]
    assert profile.model == "m" and profile.extra["num_hidden_layers"] == "4"
    assert profile.extra["n_group"] == "2" and profile.shape_trace().n_group == 2  # the config's n_group
    back = load_load_profile(save_load_profile(profile, tmp_path / "loads.safetensors"))
    assert back.counts.tolist() == EXPERTS and back.extra == profile.extra


@pytest.mark.parametrize("fmt", sorted(DUMPS))
def test_profile_solves_and_round_trips_into_the_engine_file(tmp_path: Path, config: Path, fmt: str) -> None:
    """eplb places from the profile; steptail (token-level steps) refuses; the placement goes back into the
    dump's engine's file and decodes to itself."""
    problem = PlacementProblem.from_load_profile(imported(fmt, tmp_path, config), topology(1, 2), replicas=1)
    assert problem.load.tolist() == (np.asarray(EXPERTS).sum(0)).tolist()
    with pytest.raises(ProblemError, match="no co-activation data"):
        solve_placement(problem, "steptail", {})
    placement = solve_placement(problem, "eplb", {})
    assert placement.extra["num_hidden_layers"] == 4 and placement.extra["moe_layers"] == [1, 2, 3]
    engine = ENGINE_OF[fmt]
    write_placement(placement, 4, tmp_path / "p.json")
    suffix = {"sglang": ".sglang.json", "vllm": ".vllm.jsonl", "trtllm": ".trtllm.yaml"}[engine]
    rows = read_engine_file(engine, tmp_path / f"p{suffix}", read_model_config(config), 4)
    assert np.array_equal(rows, placement.phy2log)


@pytest.mark.parametrize("solver", ["greedy", "eplb", "contiguous", "round_robin"])
def test_a_load_only_solver_places_as_from_the_trace(solver: str) -> None:
    """A profile with a trace's expert loads gives the placement the trace gives: these solvers read loads only."""
    assert solver in LOAD_ONLY_SOLVERS
    trace = random_trace(200, 3, 8, 2)
    profile = LoadProfile(counts=expert_load(trace.topk_ids, 8)[None].astype(np.int64), model="test",
                          moe_layers=trace.moe_layers, source="loads")
    from_trace = solve_placement(PlacementProblem(trace, topology(2, 2), replicas=1), solver, {})
    from_loads = solve_placement(PlacementProblem.from_load_profile(profile, topology(2, 2), replicas=1), solver, {})
    assert np.array_equal(from_trace.phy2log, from_loads.phy2log)


@pytest.mark.parametrize("solver", ["partition", "exflow", "moetuner", "steptail"])
def test_solvers_needing_token_routing_refuse_a_load_profile(solver: str) -> None:
    profile = LoadProfile(counts=np.ones((1, 2, 8), dtype=np.int64), model="m", moe_layers=[0, 1], source="loads")
    with pytest.raises(ProblemError, match=f"solver '{solver}' needs token-level routing.*no co-activation data"):
        solve_placement(PlacementProblem.from_load_profile(profile, topology(2, 2)), solver, {})
    with pytest.raises(ProblemError, match="load profile with expert loads only"):
        PlacementProblem.from_load_profile(profile, topology(2, 2)).coactivation


def test_trtllm_without_the_balancer_counts_experts(tmp_path: Path, config: Path) -> None:
    folder = trtllm_statistic(tmp_path, balancer=False)
    assert import_loads("trtllm_statistic", folder, model="m", model_config=config).counts.tolist() == EXPERTS
    (tmp_path / "on").mkdir()
    with pytest.raises(RoutingImportError, match="load balancer was on; give load_balancer="):
        import_loads("trtllm_statistic", trtllm_statistic(tmp_path / "on"), model="m", model_config=config)


def test_vllm_dump_needs_the_config_and_one_model(tmp_path: Path, config: Path) -> None:
    path = vllm_load_stats(tmp_path)
    with pytest.raises(RoutingImportError, match="give model_config="):
        import_loads("vllm_load_stats", path)
    with pytest.raises(RoutingImportError, match=r"several models \['drafter', 'm'\]; pick one with model="):
        import_loads("vllm_load_stats", path, model_config=config)
    assert import_loads("vllm_load_stats", path, model="drafter", model_config=config).counts.sum() == 9 * 6 * 3


def test_dump_of_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    other = tmp_path / "v3.json"
    other.write_text(json.dumps({**CONFIG, "num_hidden_layers": 5}))
    with pytest.raises(RoutingImportError, match=r"4 decoder layers .* but .*v3.json has 5"):
        import_loads("sglang_stat", sglang_stat(tmp_path), model="m", model_config=other)


def test_sglang_stat_without_a_config_finds_the_moe_layers(tmp_path: Path) -> None:
    profile = import_loads("sglang_stat", sglang_stat(tmp_path), model="m")
    assert profile.moe_layers == [1, 2, 3] and profile.extra["num_hidden_layers"] == "4"
    with pytest.raises(RoutingImportError, match="give model=NAME"):
        import_loads("sglang_stat", sglang_stat(tmp_path))


def test_a_trace_as_a_load_profile_by_hand(tmp_path: Path) -> None:
    """format=trace: 5 tokens of 1 layer, top-2 of 3 experts, steps of 2 tokens (the last has 1)."""
    from moetuner.trace import Trace, save_trace

    ids = np.array([[[0, 1]], [[0, 2]], [[1, 2]], [[1, 0]], [[2, 1]]], dtype=np.int16)
    trace = Trace(topk_ids=ids, seq_ids=np.zeros(5, np.int32), model="m", num_experts=3, moe_layers=[1], source="t",
                  hidden_size=8, moe_intermediate_size=8, extra={"num_hidden_layers": "2", "n_group": "3"})
    profile = import_loads("trace", save_trace(trace, tmp_path / "t.safetensors"), step_tokens=2)
    assert profile.counts.tolist() == [[[2, 1, 1]], [[1, 2, 1]], [[0, 1, 1]]]
    assert profile.moe_layers == [1] and profile.extra["num_hidden_layers"] == "2"
    assert profile.extra["n_group"] == "3"  # solver=eplb reads the model's groups from the load profile too


def test_the_import_app_writes_a_load_profile(tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from moetuner.apps.import_trace import main as import_main

    out = tmp_path / "loads.safetensors"
    monkeypatch.setattr(sys, "argv", ["moetuner-import", "format=vllm_load_stats", f"path={vllm_load_stats(tmp_path)}",
                                      f"model_config={config}", "model=m", f"out={out}", "mlflow=off",
                                      f"hydra.run.dir={tmp_path}"])
    import_main()
    assert load_load_profile(out).counts.tolist() == EXPERTS
