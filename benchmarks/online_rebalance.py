"""Online rebalancing on real routing: static vs periodic EPLB vs migration_aware (ours) vs oracle.

    .venv/bin/python benchmarks/online_rebalance.py                      # the whole table (a few minutes)
    .venv/bin/python benchmarks/online_rebalance.py --settings h100_1x8:0 --modes stop_the_world

Streams (conf/stream/): intent -> law -> intent and law -> intent -> law, 48 steps of 2048 tokens per
segment (ESFT DeepSeek-V2-Lite routing, data/esft), and the one-domain stream intent x 144; settings
h100_1x8 with 0 replicas and h200_2x8 with 1; migration modes stop_the_world and overlapped (50% of the
links). Policies as in conf/policy/ (periodic: window 8 : interval 24, vLLM's 1:3). Simulator:
dispatch_combine, dynamic dispatch (`--dataflow`, `--dispatch`). Prints the table and the aims, writes
the CSV and logs every number to MLflow (experiment `benchmarks`, run `online_rebalance`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.online.migration import MigrationConfig
from moetuner.online.policy_config import make_policy
from moetuner.online.stream_replay import make_context, replay_stream
from moetuner.online.stream import load_stream
from moetuner.topology import topology_from_config, topology_preset
from moetuner.tracking import tracked_run
from table import markdown, write_csv  # benchmarks/table.py

CONF = PROJECT_ROOT / "conf"
STREAMS = ("intent_law_intent", "law_intent_law")
ONE_DOMAIN = "intent_only"
POLICIES = ("static", "periodic", "migration_aware", "oracle")
COLUMNS = ["stream", "setting", "mode", "policy", "total_time_s", "migration_time_s", "rebalances", "experts_moved",
           "speedup_vs_contiguous", "solve_seconds_per_rebalance", "replay_wall_s"]


def conf(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))


def run_stream(stream_name: str, setting: str, modes: list[str], policies: tuple[str, ...], args) -> list[dict]:
    """Every policy x mode on one stream and setting (static and oracle move nothing: run once)."""
    spec = conf("stream", stream_name)
    segments = [{**s, "trace": str(PROJECT_ROOT / s["trace"])} for s in spec["segments"]]
    stream, profile = load_stream(segments, str(PROJECT_ROOT / spec["profile"]), args.step_tokens)
    topo_name, replicas = setting.split(":")
    ctx = make_context(stream, topology_from_config(topology_preset(topo_name)), int(replicas), args.dataflow,
                       args.dispatch, MigrationConfig())
    rows = []
    for policy in policies:
        for mode in (modes if policy not in ("static", "oracle") else modes[:1]):
            run_ctx = dataclasses.replace(ctx, migration=MigrationConfig(mode, args.bandwidth_share))
            result = replay_stream(stream, profile, make_policy(conf("policy", policy), stream), run_ctx)
            for m in (modes if policy in ("static", "oracle") else [mode]):
                rows.append({"stream": stream_name, "setting": f"{topo_name} r{replicas}", "mode": m,
                             "policy": policy, **{c: result.metrics[c] for c in COLUMNS[4:]}})
            print(f"{stream_name} {setting} {mode} {policy}: {result.metrics['total_time_s'] * 1e3:.2f} ms, "
                  f"{result.metrics['experts_moved']} moved, {result.metrics['replay_wall_s']:.0f} s", flush=True)
    return rows


def aims(rows: list[dict]) -> list[dict]:
    """Per (stream, setting, mode): the issue's four aims, measured."""
    def get(stream, setting, mode, policy):
        key = (stream, setting, mode, policy)
        return next(r for r in rows if (r["stream"], r["setting"], r["mode"], r["policy"]) == key)
    out = []
    for stream, setting, mode in sorted({(r["stream"], r["setting"], r["mode"]) for r in rows}):
        ma = get(stream, setting, mode, "migration_aware")
        static = get(stream, setting, mode, "static")
        if stream == ONE_DOMAIN:
            out.append({"stream": stream, "setting": setting, "mode": mode,
                        "ma_vs_best_baseline": None, "ma_vs_oracle": None, "moved_vs_periodic": None,
                        "ma_vs_static": ma["total_time_s"] / static["total_time_s"]})
            continue
        periodic, oracle = get(stream, setting, mode, "periodic"), get(stream, setting, mode, "oracle")
        out.append({"stream": stream, "setting": setting, "mode": mode,
                    "ma_vs_best_baseline": ma["total_time_s"] / min(static["total_time_s"], periodic["total_time_s"]),
                    "ma_vs_oracle": ma["total_time_s"] / oracle["total_time_s"],
                    "moved_vs_periodic": ma["experts_moved"] / max(periodic["experts_moved"], 1),
                    "ma_vs_static": ma["total_time_s"] / static["total_time_s"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="*", default=[*STREAMS, ONE_DOMAIN])
    parser.add_argument("--settings", nargs="*", default=["h100_1x8:0", "h200_2x8:1"], help="topology:replicas")
    parser.add_argument("--modes", nargs="*", default=["stop_the_world", "overlapped"])
    parser.add_argument("--bandwidth-share", type=float, default=0.5)
    parser.add_argument("--step-tokens", type=int, default=2048)
    parser.add_argument("--dataflow", default="dispatch_combine")
    parser.add_argument("--dispatch", default="dynamic")
    parser.add_argument("--out", default="results/benchmarks/online_rebalance.csv", help="CSV of the table")
    args = parser.parse_args()
    config = {"mlflow": {"experiment": "benchmarks"}, **vars(args)}
    started = time.perf_counter()
    with tracked_run("online_rebalance", config, tags={"benchmark": "online_rebalance"}) as run:
        rows = []
        for stream in args.streams:
            policies = ("static", "migration_aware") if stream == ONE_DOMAIN else POLICIES
            for setting in args.settings:
                rows += run_stream(stream, setting, args.modes, policies, args)
        table = aims(rows)
        print(markdown(rows, COLUMNS, ".4g"))
        print()
        print(markdown(table, list(table[0]), ".3f"))
        print(f"\nwall: {time.perf_counter() - started:.0f} s")
        for row in rows:
            key = f"{row['stream']}.{row['setting'].replace(' ', '_')}.{row['mode']}.{row['policy']}"
            run.log_metrics({f"{key}.{c}": row[c] for c in COLUMNS[4:]})
        for row in table:
            key = f"aim.{row['stream']}.{row['setting'].replace(' ', '_')}.{row['mode']}"
            run.log_metrics({f"{key}.{c}": v for c, v in row.items() if isinstance(v, float)})
        write_csv(Path(args.out), rows, COLUMNS)
        run.log_artifact(Path(args.out))


if __name__ == "__main__":
    main()
