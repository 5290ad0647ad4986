"""Online rebalancing on held-out real routing: every load-aware solver's static placement vs periodic EPLB
(at several phase offsets) vs triggered vs migration_aware (ours) vs the hindsight oracle, decision time
charged, at several stream seeds and per-rebalance overheads.

    .venv/bin/python benchmarks/online_rebalance.py --out docs/results/online --jobs 2    # the aims tables
    .venv/bin/python benchmarks/online_rebalance.py --streams tune_law_intent_law tune_ramp_intent_law \
        --settings h200_2x8:1 --ma-grid 1000:250 250:250 250:100 100:100 --out docs/results/online/tuning

Evaluation streams (conf/stream/): intent_law_intent (abrupt), ramp_law_intent (ramp), intent_only (one
domain), segments of 2930, 3130 and 2930 steps of 512 tokens (no multiple of any policy's interval), drawn
from the held-out halves of the ESFT DeepSeek-V2-Lite traces (data/esft) at every `--seeds` (the stream's
seed); settings h200_2x8 with 1 replica and h100_1x8 with 0. Policies as in conf/policy/: `static[S]` is
solver S solved once on the profile (every `--static-solvers`), `periodic[+O]` is vLLM's defaults (window
1000, interval 3000) at phase offset O (`--offsets`), `oracle` the hindsight oracle over `--oracle-solvers`.
Each (stream, setting, mode, seed) runs at every `--overheads` (migration.overhead_s: the fixed cost of a
rebalance); a static placement never redeploys, so its replay is the same at every overhead and runs once.
Simulator: dispatch_combine, dynamic dispatch; stop-the-world migrations (`--modes`). Decision time: a
stated model, each decision's counted work x conf/online.yaml's `decision_cost` per unit
(moetuner/online/decision_time.py), charged as the steps served meanwhile: the same on any machine.

Writes in --out: `runs.csv` (every replay), `aims.csv` (one row per stream, setting, mode, overhead and
seed: gains over the best static placement), `summary.csv` (the same over seeds: mean, min and max, and the
policies ranked by mean total time) and `run.json`; prints them; logs them to MLflow (experiment
`benchmarks`, run `online_rebalance`). `--jobs` runs (stream, setting, mode) jobs in parallel; each static
placement is solved once per job (the profile does not depend on the seed) and is the oracle's static
candidate. `--scale 0.1` shortens segments and every policy step count tenfold, for a quick check.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.online.decision_time import DecisionCost
from moetuner.online.migration import MigrationConfig
from moetuner.online.policy_config import make_policy
from moetuner.online.stream import load_stream
from moetuner.online.stream_replay import make_context, replay_stream
from moetuner.topology import topology_from_config, topology_preset
from moetuner.tracking import tracked_run
from table import command_line, markdown, write_csv, write_run_record  # benchmarks/table.py

CONF = PROJECT_ROOT / "conf"
STREAMS = ("intent_law_intent", "ramp_law_intent", "intent_only")
POLICIES = ("static", "periodic", "triggered", "migration_aware", "oracle")
METRICS = ["total_time_s", "migration_time_s", "migration_share", "rebalances", "experts_moved", "bytes_moved",
           "slots_changed_per_rebalance", "peak_to_average_load", "decision_delay_steps",
           "decision_seconds_per_rebalance", "speedup_vs_contiguous", "replay_wall_s"]
COLUMNS = ["stream", "setting", "mode", "overhead_s", "seed", "policy", *METRICS]
KEY = ["stream", "setting", "mode", "overhead_s"]
AIMS = [*KEY, "seed", "best_static", "best_static_s", "periodic_worst_s", "migration_aware_s", "oracle_s",
        "oracle_gain", "ma_gain", "captured", "ma_vs_periodic_min", "ma_vs_best_static", "moved_vs_periodic",
        "ma_migration_share", "ma_bytes_moved", "ma_peak_to_average", "ma_slots_per_rebalance", "ma_delay_steps"]
SUMMARIZED = ["oracle_gain", "ma_gain", "captured", "ma_vs_periodic_min", "ma_vs_best_static", "moved_vs_periodic",
              "ma_migration_share"]
SUMMARY = [*KEY, "seeds", *[f"{c}_{s}" for c in SUMMARIZED for s in ("mean", "min", "max")], "ranking"]


def conf(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))


def load(stream_name: str, seed: int, step_tokens: int, scale: float = 1.0):
    """The stream (drawn with `seed`, every segment's steps times `scale`) and its profile, paths made absolute."""
    spec = conf("stream", stream_name)
    absolute = lambda p: str(PROJECT_ROOT / p)  # noqa: E731
    spec["segments"] = [{k: (scaled(v, scale, k) if k == "steps" else
                             {absolute(p): w for p, w in v.items()} if isinstance(v, dict) else
                             [absolute(p) for p in v] if isinstance(v, list) else absolute(v))
                         for k, v in seg.items()} for seg in spec["segments"]]
    spec["profile"] = absolute(spec["profile"])
    return load_stream({**spec, "seed": seed}, step_tokens)


def decision_cost() -> DecisionCost:
    """conf/online.yaml's decision-time model (moetuner/online/decision_time.py)."""
    return DecisionCost.from_config(OmegaConf.to_container(OmegaConf.load(CONF / "online.yaml"))["decision_cost"])


SCALED = ("interval_steps", "window_steps", "check_every", "horizon_steps", "phase_offset_steps")


def run_stream(stream_name: str, setting: str, mode: str, args: argparse.Namespace) -> list[dict]:
    """Every policy on one stream, setting and migration mode, at every seed and overhead. Each static
    placement is solved once (the profile does not depend on the stream's seed) and is also the oracle's
    static candidate; per seed, one step-time cache is shared by all policies and the oracle keeps its
    solved placements across overheads."""
    topo_name, replicas = setting.split(":")
    topology = topology_from_config(topology_preset(topo_name))
    options = conf("policy", "oracle").get("solver_options") or {}
    oracle_cfg = {"name": "oracle", "solvers": args.oracle_solvers,
                  "solver_options": {s: o for s, o in options.items() if s in args.oracle_solvers}}
    configs, solved, rows = policy_configs(args), {}, []
    for seed in args.seeds:
        stream, profile = load(stream_name, seed, args.step_tokens, args.scale)
        ctx = make_context(stream, topology, int(replicas), args.dataflow, args.dispatch,
                           MigrationConfig(mode, args.bandwidth_share), decision_cost())
        ctx.step_times.keep = 64  # the static placements, periodic's and the oracle's candidates stay cached
        oracle, statics = make_policy(oracle_cfg, stream), {}
        for overhead in args.overheads:
            run_ctx = dataclasses.replace(ctx, migration=dataclasses.replace(ctx.migration, overhead_s=overhead))
            for label, cfg in configs:
                if label in statics:  # never redeploys: the same replay at every overhead
                    metrics = statics[label]
                else:
                    policy = oracle if label == "oracle" else make_policy(cfg, stream)
                    if cfg["name"] == "static":
                        if label not in solved:
                            solved[label] = policy.initial(ctx, profile)
                        policy.initial = lambda *_, d=solved[label]: d  # noqa: E731 (solved once per job)
                        if cfg["solver"] in args.oracle_solvers:
                            oracle.adopt_static(ctx, cfg["solver"], solved[label].phy2log)
                    metrics = replay_stream(stream, profile, policy, run_ctx).metrics
                    if cfg["name"] == "static":
                        statics[label] = metrics
                    print(f"{stream_name} {setting} {mode} seed {seed} overhead {overhead * 1e3:g} ms {label}: "
                          f"{metrics['total_time_s']:.5f} s, {metrics['experts_moved']} moved, delay "
                          f"{metrics['decision_delay_steps']:.0f} steps, {metrics['replay_wall_s']:.0f} s wall",
                          flush=True)
                rows.append({"stream": stream_name, "setting": f"{topo_name} r{replicas}", "mode": mode,
                             "overhead_s": overhead, "seed": seed, "policy": label,
                             **{c: metrics[c] for c in METRICS}})
    return rows


def policy_configs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label, policy config) of every policy to run: static per solver, periodic per phase offset, the rest
    as configured; --ma-grid adds migration_aware at each window:check_every. With --scale, every step count
    of a policy is scaled like the segments (a quick check keeps the policies' clocks and the stream in
    proportion)."""
    out = []
    for name in args.policies:
        cfg = conf("policy", name)
        if name == "static":
            out += [(f"static[{s}]", {**cfg, "solver": s}) for s in args.static_solvers]
        elif name == "periodic":
            out += [(f"periodic[+{o}]", {**cfg, "phase_offset_steps": o}) for o in args.offsets]
        elif name != "oracle":
            out.append((name, cfg))
    for point in args.ma_grid:
        window, check = (int(x) for x in point.split(":"))
        out.append((f"migration_aware[w{window},c{check}]",
                    {**conf("policy", "migration_aware"), "window_steps": window, "check_every": check}))
    out = [(label, {k: scaled(v, args.scale, k) if k in SCALED else v for k, v in cfg.items()}) for label, cfg in out]
    return out + [("oracle", {"name": "oracle"})] if "oracle" in args.policies else out


def scaled(steps: int, scale: float, key: str) -> int:
    """A step count times `scale`, at least 1 (an offset at least 0)."""
    return max(0 if key == "phase_offset_steps" else 1, round(steps * scale))


def aims(rows: list[dict]) -> list[dict]:
    """Per (stream, setting, mode, overhead, seed): the issue's aims, measured. Gains are shares of the best
    static placement's total time; captured = migration_aware's gain / the oracle's gain."""
    out = []
    for key in dict.fromkeys(tuple(r[c] for c in [*KEY, "seed"]) for r in rows):
        get = {r["policy"]: r for r in rows if tuple(r[c] for c in [*KEY, "seed"]) == key}
        statics = {p: r for p, r in get.items() if p.startswith("static[")}
        periodics = [r for p, r in get.items() if p.startswith("periodic[")]
        if not statics or not periodics or not {"migration_aware", "oracle"} <= set(get):
            continue
        best = min(statics, key=lambda p: statics[p]["total_time_s"])
        static, ma, oracle = (statics[best]["total_time_s"], get["migration_aware"]["total_time_s"],
                              get["oracle"]["total_time_s"])
        oracle_gain, ma_gain = 1 - oracle / static, 1 - ma / static
        moved = get["migration_aware"]
        out.append({**dict(zip([*KEY, "seed"], key)), "best_static": best, "best_static_s": static,
                    "periodic_worst_s": max(r["total_time_s"] for r in periodics), "migration_aware_s": ma,
                    "oracle_s": oracle, "oracle_gain": oracle_gain, "ma_gain": ma_gain,
                    "captured": ma_gain / oracle_gain if oracle_gain > 0 else None,
                    "ma_vs_periodic_min": min(1 - ma / r["total_time_s"] for r in periodics),
                    "ma_vs_best_static": ma / static,
                    "moved_vs_periodic": moved["experts_moved"] / max(np.mean([r["experts_moved"] for r in periodics]), 1),
                    "ma_migration_share": moved["migration_share"], "ma_bytes_moved": moved["bytes_moved"],
                    "ma_peak_to_average": moved["peak_to_average_load"],
                    "ma_slots_per_rebalance": moved["slots_changed_per_rebalance"],
                    "ma_delay_steps": moved["decision_delay_steps"]})
    return out


def summary(rows: list[dict], table: list[dict]) -> list[dict]:
    """Per (stream, setting, mode, overhead): each aim's mean, min and max over seeds, and the policies
    ranked by their mean total time over seeds (fastest first)."""
    out = []
    for key in dict.fromkeys(tuple(r[c] for c in KEY) for r in table):
        mine = [r for r in table if tuple(r[c] for c in KEY) == key]
        runs = [r for r in rows if tuple(r[c] for c in KEY) == key]
        row = {**dict(zip(KEY, key)), "seeds": len(mine)}
        for c in SUMMARIZED:
            values = [r[c] for r in mine if r[c] is not None]
            row.update({f"{c}_mean": float(np.mean(values)) if values else None,
                        f"{c}_min": min(values, default=None), f"{c}_max": max(values, default=None)})
        mean = {p: np.mean([r["total_time_s"] for r in runs if r["policy"] == p]) for p in dict.fromkeys(
            r["policy"] for r in runs)}
        row["ranking"] = " < ".join(sorted(mean, key=mean.get))
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    oracle_solvers = conf("policy", "oracle")["solvers"]
    parser.add_argument("--streams", nargs="*", default=list(STREAMS))
    parser.add_argument("--settings", nargs="*", default=["h200_2x8:1", "h100_1x8:0"], help="topology:replicas")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3, 4, 5], help="stream seeds")
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--static-solvers", nargs="*", default=oracle_solvers, help="static[S] for each")
    parser.add_argument("--oracle-solvers", nargs="*", default=oracle_solvers)
    parser.add_argument("--offsets", nargs="*", type=int, default=[0, 750, 1500, 2250],
                        help="periodic's phase offsets (steps)")
    parser.add_argument("--overheads", nargs="*", type=float, default=[0.0, 0.01, 0.1],
                        help="migration.overhead_s values (seconds per rebalance)")
    parser.add_argument("--ma-grid", nargs="*", default=[], help="window:check_every points of migration_aware")
    parser.add_argument("--modes", nargs="*", default=["stop_the_world"])
    parser.add_argument("--bandwidth-share", type=float, default=0.5)
    parser.add_argument("--step-tokens", type=int, default=512)
    parser.add_argument("--dataflow", default="dispatch_combine")
    parser.add_argument("--dispatch", default="dynamic")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="segment lengths and every policy step count times this (a quick check: 0.1)")
    parser.add_argument("--jobs", type=int, default=1, help="(stream, setting, mode) runs in parallel")
    parser.add_argument("--out", default="docs/results/online", help="folder for the CSVs")
    parser.add_argument("--note", default="", help="a note on the run for run.json (machine, wall time)")
    args = parser.parse_args()
    config = {"mlflow": {"experiment": "benchmarks"}, **vars(args)}
    started = time.perf_counter()
    jobs = [(s, t, m) for s in args.streams for t in args.settings for m in args.modes]
    with tracked_run("online_rebalance", config, tags={"benchmark": "online_rebalance"}) as run:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = [row for part in pool.map(run_stream, *zip(*jobs), [args] * len(jobs)) for row in part]
        table = aims(rows)
        means = summary(rows, table)
        print(markdown(rows, COLUMNS, ".4g"))
        for part, columns in ((table, AIMS), (means, SUMMARY)):
            if part:
                print()
                print(markdown(part, columns, ".4g"))
        wall = time.perf_counter() - started
        print(f"\nwall: {wall:.0f} s")
        for row in rows:
            key = re.sub(r"[^\w.\-:/]", "_", f"{row['stream']}.{row['setting']}.{row['mode']}.o{row['overhead_s']:g}."
                                                 f"s{row['seed']}.{row['policy']}")  # MLflow's metric-name characters
            run.log_metrics({f"{key}.{c}": row[c] for c in METRICS})
        out = Path(args.out)
        paths = [write_csv(out / "runs.csv", rows, COLUMNS)]
        if table:
            paths += [write_csv(out / "aims.csv", table, AIMS), write_csv(out / "summary.csv", means, SUMMARY)]
        paths.append(write_run_record(out, command_line("online_rebalance.py", sys.argv[1:]),
                                      args.note or f"{wall:.0f} s wall, --jobs {args.jobs}"))
        for path in paths:
            run.log_artifact(path)


if __name__ == "__main__":
    main()
