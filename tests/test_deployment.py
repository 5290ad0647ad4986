"""Deployments (moetuner/deployment.py, conf/deployment/): one unit per phase, and moetuner-solve deployment=NAME
writing one placement per phase with its engine files; bad input refused with the fix named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from moetuner import CONF_DIR, PROJECT_ROOT
from moetuner.apps.solve import deployment_problems, solve_units
from moetuner.deployment import DeploymentError, deployment_from_config, unit_from_config
from moetuner.placement import load_placement
from moetuner.trace import load_trace

INTENT = PROJECT_ROOT / "data" / "esft" / "intent.safetensors"


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("solve", overrides=list(overrides))


def test_v2_lite_units() -> None:
    deployment = deployment_from_config(config("trace=x", "out=y", "deployment=v2_lite").deployment)
    prefill, decode = deployment.units["prefill"], deployment.units["decode"]
    assert (prefill.topology.name, prefill.topology.num_gpus, decode.topology.name, decode.topology.num_gpus) == \
        ("h800_1x8", 8, "h800_4x8", 32)
    assert prefill.replicas(64) == 1 and prefill.redundant_experts(64) == 8  # 8 GPUs x 9 slots - 64
    assert decode.replicas(64) == 1 and decode.redundant_experts(64) == 32  # 32 GPUs x 3 slots - 64
    assert (prefill.phase.tokens_per_rank, prefill.phase.dataflow_on(prefill.topology)) == (4096, "dispatch_combine")
    assert (decode.phase.tokens_per_rank, decode.phase.dataflow_on(decode.topology)) == (128, "low_latency")
    assert not deployment.synthetic


def test_v3_units_are_deepseeks() -> None:
    """EP32 prefill: 9 routed experts per GPU, 32 redundant; EP144 decode: 2 per GPU, 32 redundant."""
    deployment = deployment_from_config(config("trace=x", "out=y", "deployment=v3").deployment)
    prefill, decode = deployment.units["prefill"], deployment.units["decode"]
    assert (prefill.topology.num_gpus, prefill.slots_per_gpu, prefill.redundant_experts(256)) == (32, 9, 32)
    assert (decode.topology.num_gpus, decode.topology.nodes, decode.slots_per_gpu) == (144, 18, 2)
    assert decode.redundant_experts(256) == 32 and decode.replicas(256) == 0
    assert prefill.phase.dataflow_on(prefill.topology) == "hierarchical"  # normal kernels across 4 nodes
    assert decode.phase.dataflow_on(decode.topology) == "low_latency"
    assert deployment.synthetic and deployment.model == "synthetic-deepseek-v3"


def test_bad_deployments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="256 experts on 144 GPUs need at least 2 slots per GPU, the "
                                              "deployment gives slots_per_gpu=1; raise slots_per_gpu"):
        unit_from_config("decode", {"topology": "h800_18x8", "slots_per_gpu": 1}).replicas(256)
    with pytest.raises(DeploymentError, match="name each unit by its phase"):
        deployment_from_config({"name": "x", "model": "m", "synthetic": False, "num_experts": 8, "top_k": 2,
                                "num_moe_layers": 2, "units": {"serve": {"topology": "h800_1x8", "slots_per_gpu": 1}}})
    with pytest.raises(DeploymentError, match="has no slots_per_gpu"):
        unit_from_config("decode", {"topology": "h800_1x8"})
    # a V2-Lite trace for the V3 deployment: both shapes named, and how to make the right traces
    with pytest.raises(DeploymentError, match=r"\(experts, top_k, MoE layers\) = \(64, 6, 26\), but deployment v3 is "
                                              r"for synthetic-deepseek-v3 with \(256, 8, 58\).*moetuner-synth"):
        deployment_problems(config(f"trace={INTENT}", f"out={tmp_path}/v3", "deployment=v3"))
    with pytest.raises(DeploymentError, match="give a folder"):
        deployment_problems(config(f"trace={INTENT}", f"out={tmp_path}/v2.json", "deployment=v2_lite"))
    with pytest.raises(DeploymentError, match="drop phase="):
        deployment_problems(config(f"trace={INTENT}", f"out={tmp_path}/v2", "deployment=v2_lite", "phase=decode"))


def test_v2_lite_deployment_writes_a_placement_per_phase(tmp_path: Path) -> None:
    cfg = config(f"trace={INTENT}", f"out={tmp_path}/v2", "deployment=v2_lite", "solver=eplb",
                 "deployment.units.decode.phase.num_steps=2", "deployment.units.prefill.phase.tokens_per_rank=256")
    deployment, problems = deployment_problems(cfg)
    assert problems["prefill"].step_tokens == 256 * 8 and problems["prefill"].profile.num_tokens == 4 * 2048
    assert problems["decode"].step_tokens == 128 * 32 and problems["decode"].profile.num_tokens == 2 * 4096
    result = solve_units(problems, deployment, cfg, None)
    names = sorted(p.name for p in result.artifacts)
    for phase, slots in (("prefill", 72), ("decode", 96)):
        assert [n for n in names if n.startswith(phase)] == [f"{phase}.{ext}" for ext in (
            "json", "sglang.json", "trtllm-options.yaml", "trtllm.yaml", "vllm.jsonl")]
        placement = load_placement(tmp_path / "v2" / f"{phase}.json")
        assert placement.phy2log.shape == (26, slots)
        assert (placement.extra["phase"], placement.extra["deployment"], placement.extra["synthetic"]) == \
            (phase, "v2_lite", False)
        assert result.metrics[f"{phase}.max_gpu_load"] > 0
        # SGLang's map has a row per decoder layer: 27, layer 0 dense
        assert len(json.loads((tmp_path / "v2" / f"{phase}.sglang.json").read_text())["physical_to_logical_map"]) == 27
    assert load_trace(INTENT).num_layers == 26
