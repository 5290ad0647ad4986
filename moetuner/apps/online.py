"""moetuner-online: replay a stream of serving steps through a rebalancing policy, migrations counted.

    moetuner-online stream=intent_law_intent policy=migration_aware topology=h200_2x8 replicas=1 out=online/ma
writes out/metrics.json, out/timeline.csv, out/placements/v<k>.json and out/speedup_timeline.png; with
save_steps=true also out/steps.safetensors, the served steps as a trace (moetuner-simulate
placement=OUT/placements/v0.json trace=OUT/steps.safetensors step_tokens=N scores them again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moetuner.apps.common import CONF_DIR
from moetuner.online.decision_time import DecisionCost
from moetuner.online.migration import MigrationConfig
from moetuner.online.policies import Context, Policy
from moetuner.online.policy_config import make_policy
from moetuner.online.stream_replay import make_context, replay_stream, write_outputs
from moetuner.online.stream import Stream, load_stream
from moetuner.topology import topology_from_config
from moetuner.trace import Trace
from moetuner.tracking import AppResult, AppRun, tracked_app


def prepare(cfg: Mapping[str, Any]) -> tuple[Stream, Trace, Policy, Context]:
    """Parse and check everything (stream, policy, topology, migration, dataflow, dispatch, decision cost)
    before a run."""
    stream, profile = load_stream(cfg["stream"], cfg["step_tokens"])
    policy = make_policy(cfg["policy"], stream)
    ctx = make_context(stream, topology_from_config(cfg["topology"]), int(cfg["replicas"]), str(cfg["dataflow"]),
                       str(cfg["dispatch"]), MigrationConfig.from_config(cfg["migration"]),
                       DecisionCost.from_config(cfg["decision_cost"]))
    if policy.name not in ("static", "oracle"):  # its decisions are charged (docs/online.md)
        ctx.decision_cost.check_solver(policy.solver)
    return stream, profile, policy, ctx


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="online")
@tracked_app("online")
def main(cfg: DictConfig) -> AppRun:
    plain = OmegaConf.to_container(cfg, resolve=True)
    stream, profile, policy, ctx = prepare(plain)  # bad input fails here, before a run is opened
    tags = {"model": stream.first.model, "policy": policy.name, "topology": ctx.topology.name,
            "stream": ",".join(seg.label for seg in stream.segments), "migration_mode": ctx.migration.mode,
            "dataflow": str(cfg.dataflow), "dispatch": str(cfg.dispatch)}

    def work() -> AppResult:
        result = replay_stream(stream, profile, policy, ctx)
        title = f"{policy.name} on {tags['stream']}, {ctx.topology.name} r{ctx.replicas}, {ctx.migration.mode}"
        paths = write_outputs(result, stream, ctx, title, cfg.out, bool(cfg.save_steps))
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in result.metrics.items()})
        return AppResult(result.metrics, [(p, "placements") if p.parent.name == "placements" else p for p in paths],
                         headline="total_time_s")

    return AppRun(tags, work)
