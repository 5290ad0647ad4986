"""Online rebalancing on held-out real routing: static vs periodic EPLB vs triggered vs migration_aware (ours)
vs the hindsight oracle, decision time charged.

    .venv/bin/python benchmarks/online_rebalance.py --out docs/results/online --jobs 2    # the aims table
    .venv/bin/python benchmarks/online_rebalance.py --streams tune_law_intent_law tune_ramp_intent_law \
        --settings h200_2x8:1 --ma-grid 1000:250 250:250 250:100 100:100 --out docs/results/online/tuning

Evaluation streams (conf/stream/): intent_law_intent (abrupt), ramp_law_intent (ramp), intent_only (one
domain), 3000 steps of 512 tokens per segment, drawn from the held-out halves of the ESFT DeepSeek-V2-Lite
traces (data/esft); settings h200_2x8 with 1 replica and h100_1x8 with 0. Policies as in conf/policy/
(periodic: vLLM's defaults, window 1000, interval 3000). Simulator: dispatch_combine, dynamic dispatch;
stop-the-world migrations (`--modes`). Writes `runs.csv` (every replay) and `aims.csv` (one row per stream
and setting) in --out, prints both, logs them to MLflow (experiment `benchmarks`, run `online_rebalance`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.online.migration import MigrationConfig
from moetuner.online.policy_config import make_policy
from moetuner.online.stream import load_stream
from moetuner.online.stream_replay import make_context, replay_stream
from moetuner.topology import topology_from_config, topology_preset
from moetuner.tracking import tracked_run
from table import markdown, write_csv  # benchmarks/table.py

CONF = PROJECT_ROOT / "conf"
STREAMS = ("intent_law_intent", "ramp_law_intent", "intent_only")
POLICIES = ("static", "periodic", "triggered", "migration_aware", "oracle")
COLUMNS = ["stream", "setting", "mode", "policy", "total_time_s", "migration_time_s", "rebalances", "experts_moved",
           "decision_delay_steps", "decision_seconds_per_rebalance", "speedup_vs_contiguous", "replay_wall_s"]
AIMS = ["stream", "setting", "mode", "static_s", "periodic_s", "triggered_s", "migration_aware_s", "oracle_s",
        "oracle_gain", "ma_gain", "captured", "ma_vs_periodic", "ma_vs_static", "moved_ma", "moved_periodic",
        "moved_vs_periodic", "ma_delay_steps", "periodic_delay_steps"]


def conf(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))


def run_stream(stream_name: str, setting: str, mode: str, args: argparse.Namespace) -> list[dict]:
    """Every policy on one stream, setting and migration mode (one step-time cache shared by the policies)."""
    spec = conf("stream", stream_name)
    absolute = lambda p: str(PROJECT_ROOT / p)  # noqa: E731
    spec["segments"] = [{k: (v if k == "steps" else
                             {absolute(p): w for p, w in v.items()} if isinstance(v, dict) else
                             [absolute(p) for p in v] if isinstance(v, list) else absolute(v))
                         for k, v in seg.items()} for seg in spec["segments"]]
    spec["profile"] = absolute(spec["profile"])
    stream, profile = load_stream(spec, args.step_tokens)
    topo_name, replicas = setting.split(":")
    ctx = make_context(stream, topology_from_config(topology_preset(topo_name)), int(replicas), args.dataflow,
                       args.dispatch, MigrationConfig(mode, args.bandwidth_share))
    rows = []
    for policy, cfg in policy_configs(args):
        result = replay_stream(stream, profile, make_policy(cfg, stream), dataclasses.replace(ctx))
        rows.append({"stream": stream_name, "setting": f"{topo_name} r{replicas}", "mode": mode, "policy": policy,
                     **{c: result.metrics[c] for c in COLUMNS[4:]}})
        print(f"{stream_name} {setting} {mode} {policy}: {result.metrics['total_time_s']:.4f} s, "
              f"{result.metrics['experts_moved']} moved, delay {result.metrics['decision_delay_steps']:.0f} steps, "
              f"{result.metrics['replay_wall_s']:.0f} s wall", flush=True)
    return rows


def policy_configs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label, policy config) of every policy to run; --ma-grid adds migration_aware at each window:check_every."""
    out = [(name, conf("policy", name)) for name in args.policies]
    for point in args.ma_grid:
        window, check = (int(x) for x in point.split(":"))
        out.append((f"migration_aware[w{window},c{check}]",
                    {**conf("policy", "migration_aware"), "window_steps": window, "check_every": check}))
    return out


def aims(rows: list[dict]) -> list[dict]:
    """Per (stream, setting, mode): the issue's aims, measured (gains are shares of static's total time)."""
    out = []
    for stream, setting, mode in dict.fromkeys((r["stream"], r["setting"], r["mode"]) for r in rows):
        get = {r["policy"]: r for r in rows if (r["stream"], r["setting"], r["mode"]) == (stream, setting, mode)}
        if not {"static", "periodic", "migration_aware", "oracle"} <= set(get):
            continue
        total = {p: get[p]["total_time_s"] for p in get}
        static, ma = total["static"], total["migration_aware"]
        oracle_gain, ma_gain = 1 - total["oracle"] / static, 1 - ma / static
        out.append({"stream": stream, "setting": setting, "mode": mode,
                    **{f"{p}_s": total.get(p) for p in POLICIES},
                    "oracle_gain": oracle_gain, "ma_gain": ma_gain,
                    "captured": ma_gain / oracle_gain if oracle_gain > 0 else None,
                    "ma_vs_periodic": 1 - ma / total["periodic"], "ma_vs_static": ma / static,
                    "moved_ma": get["migration_aware"]["experts_moved"],
                    "moved_periodic": get["periodic"]["experts_moved"],
                    "moved_vs_periodic": (get["migration_aware"]["experts_moved"]
                                          / max(get["periodic"]["experts_moved"], 1)),
                    "ma_delay_steps": get["migration_aware"]["decision_delay_steps"],
                    "periodic_delay_steps": get["periodic"]["decision_delay_steps"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="*", default=list(STREAMS))
    parser.add_argument("--settings", nargs="*", default=["h200_2x8:1", "h100_1x8:0"], help="topology:replicas")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--ma-grid", nargs="*", default=[], help="window:check_every points of migration_aware")
    parser.add_argument("--modes", nargs="*", default=["stop_the_world"])
    parser.add_argument("--bandwidth-share", type=float, default=0.5)
    parser.add_argument("--step-tokens", type=int, default=512)
    parser.add_argument("--dataflow", default="dispatch_combine")
    parser.add_argument("--dispatch", default="dynamic")
    parser.add_argument("--jobs", type=int, default=1, help="(stream, setting, mode) runs in parallel")
    parser.add_argument("--out", default="docs/results/online", help="folder for runs.csv and aims.csv")
    args = parser.parse_args()
    config = {"mlflow": {"experiment": "benchmarks"}, **vars(args)}
    started = time.perf_counter()
    jobs = [(s, t, m) for s in args.streams for t in args.settings for m in args.modes]
    with tracked_run("online_rebalance", config, tags={"benchmark": "online_rebalance"}) as run:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = [row for part in pool.map(run_stream, *zip(*jobs), [args] * len(jobs)) for row in part]
        table = aims(rows)
        print(markdown(rows, COLUMNS, ".4g"))
        print()
        if table:
            print(markdown(table, AIMS, ".4g"))
        print(f"\nwall: {time.perf_counter() - started:.0f} s")
        for row in rows:
            key = f"{row['stream']}.{row['setting'].replace(' ', '_')}.{row['mode']}.{row['policy']}"
            run.log_metrics({f"{key}.{c}": row[c] for c in COLUMNS[4:]})
        out = Path(args.out)
        write_csv(out / "runs.csv", rows, COLUMNS)
        run.log_artifact(out / "runs.csv")
        if table:
            write_csv(out / "aims.csv", table, AIMS)
            run.log_artifact(out / "aims.csv")


if __name__ == "__main__":
    main()
