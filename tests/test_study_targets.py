"""The study grid expanded into targets (moetuner.study.targets): hand-written expected files for the tiny
study and for a small config with an unavailable `import` trace, a regime section and an online stream."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from moetuner import PROJECT_ROOT
from moetuner.study import targets
from moetuner.study.jobs import format_wildcards, job_prefix, parse_wildcards

TINY = yaml.safe_load((PROJECT_ROOT / "conf" / "study" / "tiny.yaml").read_text())
R = "results/tiny"


# --- the tiny study (conf/study/tiny.yaml) ------------------------------------------------------------

def test_tiny_grid_points_in_config_order() -> None:
    assert targets.grid_points(TINY, ["synth-a", "synth-b"]) == [
        ("synth-a", "cpu_2x2", "contiguous", 0, ["heldout", "synth-b"]),
        ("synth-a", "cpu_2x2", "eplb", 0, ["heldout", "synth-b"]),
        ("synth-a", "cpu_2x2", "eplb", 1, ["heldout"]),
        ("synth-a", "cpu_2x2", "contiguous", 0, ["heldout"]),  # the re-split grid on the main split
        ("synth-a", "cpu_2x2", "eplb", 0, ["heldout"]),
    ]


def test_tiny_simulation_targets_merge_served_placements() -> None:
    # the two served placements (contiguous, eplb at r0 on cpu_2x2, heldout) are grid points already, and so
    # are the third grid's on the main split (seed 0); its seed 1 is the re-split synth-a.split1
    assert targets.simulation_targets(TINY, ["synth-a", "synth-b"], R) == [
        f"{R}/simulate/synth-a.split1/cpu_2x2/contiguous-r0/heldout/metrics.json",
        f"{R}/simulate/synth-a.split1/cpu_2x2/eplb-r0/heldout/metrics.json",
        f"{R}/simulate/synth-a/cpu_2x2/contiguous-r0/heldout/metrics.json",
        f"{R}/simulate/synth-a/cpu_2x2/contiguous-r0/synth-b/metrics.json",
        f"{R}/simulate/synth-a/cpu_2x2/eplb-r0/heldout/metrics.json",
        f"{R}/simulate/synth-a/cpu_2x2/eplb-r0/synth-b/metrics.json",
        f"{R}/simulate/synth-a/cpu_2x2/eplb-r1/heldout/metrics.json",
    ]
    assert targets.resplit_traces(TINY, ["synth-a", "synth-b"]) == ["synth-a.split1"]


def test_tiny_serve_profile_regime_and_online_targets() -> None:
    available = ["synth-a", "synth-b"]
    assert targets.serve_points(TINY, available) == [("synth-a", "contiguous", 0), ("synth-a", "eplb", 0)]
    assert targets.serve_targets(TINY, available, R) == [f"{R}/serve/synth-a/cpu_2x2/contiguous-r0/metrics.json",
                                                         f"{R}/serve/synth-a/cpu_2x2/eplb-r0/metrics.json"]
    assert targets.profile_targets(TINY, available, R) == [f"{R}/profiles/synth-a/summary.json"]
    assert targets.regime_trace(TINY, available) == "synth-a"
    assert targets.regime_placements(TINY, available, R) == [f"{R}/placements/synth-a/cpu_2x2/contiguous-r0.json",
                                                             f"{R}/placements/synth-a/cpu_2x2/eplb-r0.json",
                                                             f"{R}/placements/synth-a/cpu_2x2/eplb-r1.json"]
    assert targets.online_stream(TINY, available) is None  # `online: {segments: []}`
    assert targets.online_targets(TINY, available, R) == []


def test_tiny_phase_targets_one_per_solver_and_unit() -> None:
    # conf/study/tiny.yaml's phases: deployment tiny (conf/deployment/tiny.yaml: prefill then decode units)
    assert targets.phase_units(TINY) == ["prefill", "decode"]
    assert targets.phase_targets(TINY, ["synth-a", "synth-b"], R) == [
        f"{R}/phases/synth-a/tiny/{solver}/{phase}/heldout/metrics.json"
        for solver in ("eplb", "steptail") for phase in ("prefill", "decode")]
    assert targets.phase_placement_path(R, "synth-a", "tiny", "eplb", "decode") == \
        f"{R}/phases/synth-a/tiny/eplb/decode.json"
    # each unit's topology, the phase and the unit's overrides of it, then `phases.simulate`
    # the bound once per phase: with the first solver's run
    assert targets.phase_simulate_args(TINY, "prefill", "eplb") == [
        "topology=cpu_2x2", "phase=prefill", "phase.tokens_per_rank=64", "phase.num_steps=2", "bound=true"]
    assert targets.phase_simulate_args(TINY, "decode", "steptail") == [
        "topology=cpu_2x2", "phase=decode", "phase.tokens_per_rank=8", "phase.num_steps=4"]
    assert targets.phase_simulate_args({**TINY, "phases": {**TINY["phases"], "bound": False, "simulate": ["x=1"]}},
                                       "decode", "eplb")[-2:] == ["phase.num_steps=4", "x=1"]
    assert targets.phase_targets({**TINY, "phases": None}, ["synth-a"], R) == []
    assert targets.phase_units({**TINY, "phases": None}) == []


def test_tiny_bound_once_per_grid_setting_on_held_out_steps() -> None:
    # settings (synth-a, cpu_2x2, r0): contiguous first in config order; (synth-a, cpu_2x2, r1): eplb
    assert targets.bound_runs(TINY, ["synth-a", "synth-b"]) == {("synth-a", "cpu_2x2", "contiguous", 0),
                                                                 ("synth-a", "cpu_2x2", "eplb", 1)}
    simulate, bounds = TINY["simulate"], targets.bound_runs(TINY, ["synth-a"])
    assert targets.simulate_args(TINY, bounds, "synth-a", "cpu_2x2", "contiguous", 0, "heldout") == \
        [*simulate, "bound=true"]
    assert targets.simulate_args(TINY, bounds, "synth-a", "cpu_2x2", "contiguous", 0, "synth-b") == simulate
    assert targets.simulate_args(TINY, bounds, "synth-a", "cpu_2x2", "eplb", 0, "heldout") == simulate
    assert targets.simulate_args(TINY, bounds, "synth-a.split1", "cpu_2x2", "contiguous", 0, "heldout") == \
        simulate  # re-splits: main split only
    assert targets.bound_runs({**TINY, "bound": False}, ["synth-a"]) == set()


def test_tiny_has_nothing_without_its_traces() -> None:
    assert targets.grid_points(TINY, []) == []
    assert targets.simulation_targets(TINY, [], R) == []
    assert targets.serve_targets(TINY, [], R) == []
    assert targets.profile_targets(TINY, [], R) == []
    assert targets.regime_trace(TINY, []) is None and targets.regime_placements(TINY, [], R) == []
    assert targets.phase_targets(TINY, [], R) == []


# --- a config with an import trace, regime and online ---------------------------------------------------

CONFIG = {
    "traces": {"a": {"kind": "synth"}, "b": {"kind": "file", "path": "data/esft/law.safetensors"},
               "real": {"kind": "import", "real": "some/real"}},
    "grids": [
        {"traces": ["real", "a"], "topologies": ["t1", "t2"], "solvers": ["s"], "replicas": [0, 2],
         "evaluate_on": ["heldout", "real", "b"]},
        {"traces": ["b"], "topologies": ["t2"], "solvers": ["s", "u"], "replicas": [1], "evaluate_on": ["a"]},
    ],
    "serve": {"traces": ["real", "b"], "topology": "t1", "solvers": ["u"], "replicas": [0, 1]},
    "regime": {"traces": ["real", "a"], "topologies": ["t2"]},
    "online": {"segments": [{"trace": "a", "steps": 3}, {"trace": "b", "steps": 2.0}], "topology": "t2",
               "replicas": 1, "policies": ["static", "periodic"], "args": ["step_tokens=64"],
               "policy_args": {"periodic": ["policy.interval_steps=2"]}},
}


def test_import_trace_without_real_data_is_skipped(tmp_path: Path) -> None:
    traces = CONFIG["traces"]
    assert targets.available_traces(traces, tmp_path) == ["a", "b"]
    assert targets.skipped_traces(traces, tmp_path) == [f"real ({tmp_path / 'some/real'})"]
    (tmp_path / "some" / "real").mkdir(parents=True)
    assert targets.available_traces(traces, tmp_path) == ["a", "b", "real"]
    assert targets.skipped_traces(traces, tmp_path) == []


def test_points_leave_out_unavailable_traces_and_evaluations() -> None:
    available = ["a", "b"]
    assert targets.grid_points(CONFIG, available) == [
        ("a", "t1", "s", 0, ["heldout", "b"]), ("a", "t1", "s", 2, ["heldout", "b"]),
        ("a", "t2", "s", 0, ["heldout", "b"]), ("a", "t2", "s", 2, ["heldout", "b"]),
        ("b", "t2", "s", 1, ["a"]), ("b", "t2", "u", 1, ["a"]),
    ]
    assert targets.serve_trace(CONFIG, available) == "b"
    assert targets.serve_points(CONFIG, available) == [("b", "u", 0), ("b", "u", 1)]


def test_targets_of_a_small_config() -> None:
    available, r = ["a", "b"], "out"
    sim = "out/simulate"
    assert targets.simulation_targets(CONFIG, available, r) == [
        f"{sim}/a/t1/s-r0/b/metrics.json", f"{sim}/a/t1/s-r0/heldout/metrics.json",
        f"{sim}/a/t1/s-r2/b/metrics.json", f"{sim}/a/t1/s-r2/heldout/metrics.json",
        f"{sim}/a/t2/s-r0/b/metrics.json", f"{sim}/a/t2/s-r0/heldout/metrics.json",
        f"{sim}/a/t2/s-r2/b/metrics.json", f"{sim}/a/t2/s-r2/heldout/metrics.json",
        f"{sim}/b/t1/u-r0/heldout/metrics.json", f"{sim}/b/t1/u-r1/heldout/metrics.json",  # served
        f"{sim}/b/t2/s-r1/a/metrics.json", f"{sim}/b/t2/u-r1/a/metrics.json",
    ]
    assert targets.serve_targets(CONFIG, available, r) == ["out/serve/b/t1/u-r0/metrics.json",
                                                           "out/serve/b/t1/u-r1/metrics.json"]
    assert targets.profile_targets(CONFIG, available, r) == ["out/profiles/a/summary.json",
                                                             "out/profiles/b/summary.json"]
    # regime: `real` is unavailable, so `a`; only its points on t2
    assert targets.regime_trace(CONFIG, available) == "a"
    assert targets.regime_placements(CONFIG, available, r) == ["out/placements/a/t2/s-r0.json",
                                                               "out/placements/a/t2/s-r2.json"]
    assert targets.online_targets(CONFIG, available, r) == ["out/online/a-b/t2-r1/static/metrics.json",
                                                            "out/online/a-b/t2-r1/periodic/metrics.json"]
    assert targets.online_targets(CONFIG, ["a"], r) == []  # `b` of the stream missing: no online stage


def test_resplits_are_named_by_seed_and_split_with_it() -> None:
    """A grid's split_seeds: the main split's seed keeps the trace's files, every other seed is solved and scored
    again as `<trace>.split<seed>`, split from the trace with `split:` and that seed."""
    config = {**CONFIG, "split": ["holdout_fraction=0.5", "seed=2"],
              "grids": [{**CONFIG["grids"][1], "split_seeds": [2, 0, 5]}]}
    assert targets.main_split_seed(config) == 2 and targets.main_split_seed({"split": []}) == 0
    assert targets.resplit_points(config, ["a", "b"]) == [
        ("b.split0", "t2", "s", 1, ["a"]), ("b.split0", "t2", "u", 1, ["a"]),
        ("b.split5", "t2", "s", 1, ["a"]), ("b.split5", "t2", "u", 1, ["a"])]
    assert targets.resplit_traces(config, ["a", "b"]) == ["b.split0", "b.split5"]
    assert targets.resplit_points(config, ["a"]) == []  # b unavailable
    held_only = {**config, "grids": [{**config["grids"][0], "evaluate_on": ["heldout", "a"],
                                      "split_evaluate_on": ["heldout"]}]}
    assert targets.resplit_points(held_only, ["a", "b"])[0] == ("b.split0", "t2", "s", 1, ["heldout"])
    assert targets.grid_points(held_only, ["a", "b"])[0] == ("b", "t2", "s", 1, ["heldout", "a"])
    assert targets.split_variant("b", 2, 2) == "b" and targets.split_variant("b", 5, 2) == "b.split5"
    assert targets.parse_split_variant("b.split5") == ("b", 5) and targets.parse_split_variant("b") == ("b", None)
    assert targets.parse_split_variant("my.split.trace") == ("my.split.trace", None)
    assert targets.split_args(config, "b") == ["holdout_fraction=0.5", "seed=2"]
    assert targets.split_args(config, "b.split5") == ["holdout_fraction=0.5", "seed=5"]
    assert "out/simulate/b.split5/t2/u-r1/a/metrics.json" in targets.simulation_targets(config, ["a", "b"], "out")
    assert re.fullmatch(targets.one_of(targets.resplit_traces(config, ["a", "b"])), "b.split5")
    assert not re.fullmatch(targets.one_of([]), "b.split5")


def test_online_args_of_each_policy() -> None:
    """The stream draws from the held-out splits, the static placement is solved on the profile split."""
    stream = ("stream.segments=[{trace:out/splits/a/heldout.safetensors,steps:3},"
              "{trace:out/splits/b/heldout.safetensors,steps:2}]")
    common = [stream, "stream.profile=out/splits/a/profile.safetensors", "stream.split=null", "stream.seed=0",
              "topology=t2", "replicas=1"]
    assert targets.online_inputs(CONFIG, "out") == ["out/splits/a/heldout.safetensors",
                                                    "out/splits/a/profile.safetensors",
                                                    "out/splits/b/heldout.safetensors"]
    assert targets.online_args(CONFIG, "out", "static") == [*common, "policy=static", "step_tokens=64"]
    assert targets.online_args(CONFIG, "out", "periodic") == [*common, "policy=periodic", "step_tokens=64",
                                                              "policy.interval_steps=2"]


def test_paths_and_wildcard_patterns() -> None:
    assert targets.evaluation_path("out", "a", "heldout") == "out/splits/a/heldout.safetensors"
    assert targets.evaluation_path("out", "a", "b") == "out/traces/b.safetensors"
    # the rules name their outputs with the same functions, wildcards in braces
    assert targets.placement_path("out", "{trace}", "{topology}", "{solver}", "{replicas}") == \
        "out/placements/{trace}/{topology}/{solver}-r{replicas}.json"
    traces = {"x.1": {"kind": "file"}, "y": {"kind": "synth"}, "z": {"kind": "file"}}
    pattern = targets.traces_of_kind(traces, "file")
    assert [n for n in ("x.1", "xa1", "y", "z") if re.fullmatch(pattern, n)] == ["x.1", "z"]
    assert targets.traces_of_kind(traces, "import") == "^$"
    assert targets.shell_args(["a=1", "b=[x, y]", 3]) == "a=1 'b=[x, y]' 3"


def test_run_names_parse_back() -> None:
    assert targets.parse_run("round_robin-r2") == ("round_robin", 2)
    assert targets.parse_run("eplb_node_groups-r12") == ("eplb_node_groups", 12)
    with pytest.raises(targets.LayoutError, match="<solver>-r<replicas>"):
        targets.parse_run("eplb")


def test_find_files_reads_what_the_path_functions_write(tmp_path: Path) -> None:
    """The report's reading side: files made with the rules' path functions come back with their fields;
    a placement's engine files and files outside the layout are left out."""
    r = str(tmp_path)
    made = [targets.placement_path(r, "intent", "h200_2x8", "eplb", 1),
            targets.placement_path(r, "intent", "h200_2x8", "eplb", 1).replace(".json", ".sglang.json"),
            targets.placement_path(r, "intent", "h200_2x8", "eplb", 1).replace(".json", ".vllm.json"),
            targets.simulate_path(r, "intent", "h100_1x8", "round_robin", 0, "law"),
            targets.per_layer_path(r, "intent", "h100_1x8", "round_robin", 0, "law"),
            targets.serve_path(r, "intent", "h200_2x8", "steptail", 0),
            targets.online_path(r, "intent-law", "h200_2x8-r1", "static"),
            targets.phase_simulate_path(r, "intent", "v2_lite", "steptail", "decode", "heldout"),
            f"{r}/simulate/intent/h100_1x8/eplb/heldout/metrics.json"]  # not <solver>-r<replicas>
    for path in made:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("{}")
    found = lambda kind: [(p.relative_to(tmp_path).as_posix(), f) for p, f in targets.find_files(tmp_path, kind)]  # noqa: E731
    assert found("placement") == [("placements/intent/h200_2x8/eplb-r1.json",
                                   {"trace": "intent", "topology": "h200_2x8", "solver": "eplb", "replicas": "1"})]
    assert found("simulate") == [("simulate/intent/h100_1x8/round_robin-r0/law/metrics.json",
                                  {"trace": "intent", "topology": "h100_1x8", "solver": "round_robin",
                                   "replicas": "0", "evaluate_on": "law"})]
    assert [f for _, f in found("serve")] == [{"trace": "intent", "topology": "h200_2x8", "solver": "steptail",
                                               "replicas": "0"}]
    assert [f for _, f in found("online")] == [{"stream": "intent-law", "setting": "h200_2x8-r1", "policy": "static"}]
    assert [f for _, f in found("phase_simulate")] == [{"trace": "intent", "deployment": "v2_lite", "solver": "steptail",
                                                        "phase": "decode", "evaluate_on": "heldout"}]
    assert found("regime") == []
    assert targets.regime_path(r) == f"{r}/regime/regime.csv"


def test_job_prefix_wildcards_round_trip() -> None:
    wildcards = {"trace": "intent", "topology": "h200_2x8", "replicas": "1"}
    assert format_wildcards(wildcards) == "trace=intent,topology=h200_2x8,replicas=1"
    assert parse_wildcards(format_wildcards(wildcards)) == wildcards
    assert parse_wildcards("") == {}
    assert job_prefix("results/my study", "solve", wildcards) == (
        "python -m moetuner.study job --results 'results/my study' --rule solve "
        "--wildcards 'trace=intent,topology=h200_2x8,replicas=1' --")


# --- a `loads` trace: the load profile of another trace's profile split -----------------------------------

def test_a_loads_trace_is_solved_and_scored_like_its_trace(tmp_path: Path) -> None:
    traces = {**CONFIG["traces"], "la": {"kind": "loads", "of": "a"}, "lr": {"kind": "loads", "of": "real"}}
    config = {**CONFIG, "traces": traces, "grids": [
        {"traces": ["la", "lr"], "topologies": ["t1"], "solvers": ["eplb"], "replicas": [1], "evaluate_on": ["heldout", "b"]}]}
    available = targets.available_traces(traces, tmp_path)
    assert available == ["a", "b", "la"]  # `real` is absent, so is its loads trace
    assert targets.simulation_targets(config, available, "out") == [
        "out/simulate/b/t1/u-r0/heldout/metrics.json", "out/simulate/b/t1/u-r1/heldout/metrics.json",  # served
        "out/simulate/la/t1/eplb-r1/b/metrics.json", "out/simulate/la/t1/eplb-r1/heldout/metrics.json"]
    assert targets.profile_targets(config, available, "out") == ["out/profiles/b/summary.json"]  # no `la`: loads only
    assert targets.evaluation_path("out", "la", "heldout") == "out/splits/la/heldout.safetensors"
    assert re.fullmatch(targets.traces_of_kind(traces, *targets.ROUTING_KINDS), "a")
    assert not re.fullmatch(targets.traces_of_kind(traces, *targets.ROUTING_KINDS), "la")
