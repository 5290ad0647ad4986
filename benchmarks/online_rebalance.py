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

Writes in --out: `runs.csv` (every replay), `aims.csv` (one row per stream, setting, mode, overhead and seed:
gains over the best static placement), `summary.csv` (the same over seeds: mean, min and max, and the policies
ranked by mean total time), `table.csv` (the aims as 'mean [min, max]' over seeds: docs/online.md),
`ranking.csv`, `policies.csv` (every policy's means over seeds) and `run.json`; prints them; `--runs-from`
adds the rows of earlier invocations (e.g. migration_aware run after the references) before the aims are
measured; logs them to MLflow (experiment `benchmarks`, run `online_rebalance`). `--jobs` runs (stream,
setting, mode, seed) jobs in parallel, each writing its rows to `--out/parts/` when done; each static
placement is solved once per job and is the oracle's static candidate. `--scale s` (< 1) is a shortened
replica of the run: segments and every policy step count times s, and so that every cost keeps its proportion
to the shorter stream, decision seconds (the model's unit costs), transfer seconds (an expert's bytes) and the
per-rebalance overhead times s too; `bytes_moved` and `decision_seconds_per_rebalance` are reported unscaled
(divided by s), `overhead_s` as given.
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


def decision_cost(scale: float = 1.0) -> DecisionCost:
    """conf/online.yaml's decision-time model (moetuner/online/decision_time.py), every unit cost times
    `scale` (--scale: a shortened stream keeps its decisions' delays in proportion)."""
    cost = DecisionCost.from_config(OmegaConf.to_container(OmegaConf.load(CONF / "online.yaml"))["decision_cost"])
    return DecisionCost({unit: seconds * scale for unit, seconds in cost.per_unit.items()})


SCALED = ("interval_steps", "window_steps", "check_every", "horizon_steps", "phase_offset_steps")


def run_stream(stream_name: str, setting: str, mode: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """Every policy on one stream, setting, migration mode and stream seed, at every overhead; the rows are
    also written to --out/parts/ as soon as they are done (a long run's finished jobs survive it; join
    them with --runs-from). Each static placement is solved once and is also the oracle's static
    candidate; one step-time cache is shared by all policies and the oracle keeps its solved placements
    across overheads."""
    topo_name, replicas = setting.split(":")
    topology = topology_from_config(topology_preset(topo_name))
    options = conf("policy", "oracle").get("solver_options") or {}
    oracle_cfg = {"name": "oracle", "solvers": args.oracle_solvers,
                  "solver_options": {s: o for s, o in options.items() if s in args.oracle_solvers}}
    configs, solved, rows = policy_configs(args), {}, []
    stream, profile = load(stream_name, seed, args.step_tokens, args.scale)
    ctx = make_context(stream, topology, int(replicas), args.dataflow, args.dispatch,
                       MigrationConfig(mode, args.bandwidth_share), decision_cost(args.scale))
    ctx.bytes_per_expert *= args.scale  # transfers last `scale` as long (bytes_moved is reported unscaled)
    # every placement of the seed stays cached across policies and overheads (1.5 GB of [S, L] times)
    ctx.step_times.keep = max(64, int(1.5e9 // (stream.num_steps * stream.first.num_layers * 3 * 8)))
    oracle, statics = make_policy(oracle_cfg, stream), {}
    for overhead in args.overheads:
        run_ctx = dataclasses.replace(ctx, migration=dataclasses.replace(ctx.migration,
                                                                         overhead_s=overhead * args.scale))
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
                         **{c: metrics[c] for c in METRICS}, "bytes_moved": metrics["bytes_moved"] / args.scale,
                         "decision_seconds_per_rebalance": metrics["decision_seconds_per_rebalance"] / args.scale})
    part = Path(args.out) / "parts" / f"{stream_name}.{setting.replace(':', '-r')}.{mode}.s{seed}.csv"
    write_csv(part, rows, COLUMNS)
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
        out.append(ma_point(point))
    out = [(label, {k: scaled(v, args.scale, k) if k in SCALED else v for k, v in cfg.items()}) for label, cfg in out]
    return out + [("oracle", {"name": "oracle"})] if "oracle" in args.policies else out


def ma_point(point: str) -> tuple[str, dict]:
    """`--ma-grid` point window:check_every[:min_gain:max_moves] as (label, migration_aware config)."""
    parts = point.split(":")
    if len(parts) not in (2, 4):
        raise SystemExit(f"--ma-grid {point!r}: give window:check_every or window:check_every:min_gain:max_moves")
    cfg = {**conf("policy", "migration_aware"), "window_steps": int(parts[0]), "check_every": int(parts[1])}
    label = f"w{parts[0]},c{parts[1]}"
    if len(parts) == 4:
        cfg.update(min_gain=float(parts[2]), max_moves=int(parts[3]))
        label += f",g{parts[2]},m{parts[3]}"
    return f"migration_aware[{label}]", cfg


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


def spread(values: list[float], fmt: str) -> str:
    """'mean [min, max]' of `values` over seeds, each as `fmt`; '-' when none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{format(float(np.mean(values)), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def docs_table(table: list[dict]) -> list[dict]:
    """docs/online.md's aims table: per (stream, setting, mode, overhead), each aim as 'mean [min, max]' over
    seeds (percentages of the best static placement's total, unless named otherwise)."""
    out = []
    for key in dict.fromkeys(tuple(r[c] for c in KEY) for r in table):
        mine = [r for r in table if tuple(r[c] for c in KEY) == key]
        pct = lambda c: spread([100 * r[c] if r[c] is not None else None for r in mine], ".2f")  # noqa: E731
        best = [r["best_static"] for r in mine]
        out.append({"stream": key[0], "setting": key[1], "overhead_ms": f"{1e3 * key[3]:g}", "seeds": len(mine),
                    "best static": ", ".join(f"{p} x{best.count(p)}" for p in dict.fromkeys(best)),
                    "oracle gain %": pct("oracle_gain"), "ma gain %": pct("ma_gain"), "captured %": pct("captured"),
                    "ma vs nearest periodic %": pct("ma_vs_periodic_min"),
                    "ma / best static": spread([r["ma_vs_best_static"] for r in mine], ".4f"),
                    "moved / periodic": spread([r["moved_vs_periodic"] for r in mine], ".2f"),
                    "ma GB moved": spread([r["ma_bytes_moved"] / 1e9 for r in mine], ".1f"),
                    "ma migration share %": pct("ma_migration_share"),
                    "ma peak/avg": spread([r["ma_peak_to_average"] for r in mine], ".3f"),
                    "ma slots per redeployment": spread([r["ma_slots_per_rebalance"] for r in mine], ".0f"),
                    "ma delay steps": spread([r["ma_delay_steps"] for r in mine], ".0f")})
    return out


def policy_table(rows: list[dict]) -> list[dict]:
    """Every policy per (stream, setting, mode, overhead), means over seeds: total time (and its range), moves,
    bytes, migration share, peak-to-average GPU load, slots changed per redeployment, decision delay."""
    out = []
    for key in dict.fromkeys(tuple(r[c] for c in [*KEY, "policy"]) for r in rows):
        mine = [r for r in rows if tuple(r[c] for c in [*KEY, "policy"]) == key]
        mean = lambda c: float(np.mean([r[c] for r in mine]))  # noqa: E731
        out.append({"stream": key[0], "setting": key[1], "overhead_ms": f"{1e3 * key[3]:g}", "policy": key[4],
                    "total s": spread([r["total_time_s"] for r in mine], ".4f"), "rebalances": f"{mean('rebalances'):.1f}",
                    "experts moved": f"{mean('experts_moved'):.0f}", "GB moved": f"{mean('bytes_moved') / 1e9:.1f}",
                    "migration share %": f"{100 * mean('migration_share'):.3f}",
                    "peak/avg": f"{mean('peak_to_average_load'):.3f}",
                    "slots per redeployment": f"{mean('slots_changed_per_rebalance'):.0f}",
                    "delay steps": f"{mean('decision_delay_steps'):.0f}"})
    return out


def read_runs(path: str) -> list[dict]:
    """The rows of an earlier runs.csv (--runs-from), numbers as numbers."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.update({c: float(row[c]) for c in ["overhead_s", *METRICS]}, seed=int(row["seed"]))
    return rows


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
    parser.add_argument("--ma-grid", nargs="*", default=[],
                        help="migration_aware at window:check_every[:min_gain:max_moves] points")
    parser.add_argument("--modes", nargs="*", default=["stop_the_world"])
    parser.add_argument("--bandwidth-share", type=float, default=0.5)
    parser.add_argument("--step-tokens", type=int, default=512)
    parser.add_argument("--dataflow", default="dispatch_combine")
    parser.add_argument("--dispatch", default="dynamic")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="segment lengths, every policy step count, decision, migration and overhead seconds "
                             "times this (a shortened stream with every cost in proportion; a quick check: 0.1)")
    parser.add_argument("--jobs", type=int, default=1, help="(stream, setting, mode) runs in parallel")
    parser.add_argument("--out", default="docs/results/online", help="folder for the CSVs")
    parser.add_argument("--note", default="", help="a note on the run for run.json (machine, wall time)")
    parser.add_argument("--runs-from", nargs="*", default=[],
                        help="runs.csv of earlier invocations (other --policies, same streams, seeds and --scale) "
                             "whose rows join this one's before the aims are measured")
    args = parser.parse_args()
    config = {"mlflow": {"experiment": "benchmarks"}, **vars(args)}
    started = time.perf_counter()
    jobs = [(s, t, m, seed) for seed in args.seeds for s in args.streams for t in args.settings for m in args.modes
            if args.policies or args.ma_grid]  # none: only the --runs-from rows are summarised
    with tracked_run("online_rebalance", config, tags={"benchmark": "online_rebalance"}) as run:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = [row for part in pool.map(run_stream, *zip(*jobs), [args] * len(jobs)) for row in part]
        rows = [row for path in args.runs_from for row in read_runs(path)] + rows
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
            docs = docs_table(table)
            ranking = [{"stream": r["stream"], "setting": r["setting"], "overhead_ms": f"{1e3 * r['overhead_s']:g}",
                        "policies by mean total time, fastest first": r["ranking"]} for r in means]
            paths += [write_csv(out / "table.csv", docs, list(docs[0])),
                      write_csv(out / "ranking.csv", ranking, list(ranking[0]))]
        policies = policy_table(rows)
        paths.append(write_csv(out / "policies.csv", policies, list(policies[0])))
        paths.append(write_run_record(out, command_line("online_rebalance.py", sys.argv[1:]),
                                      args.note or f"{wall:.0f} s wall, --jobs {args.jobs}"))
        for path in paths:
            run.log_artifact(path)


if __name__ == "__main__":
    main()
