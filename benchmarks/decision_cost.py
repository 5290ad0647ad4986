"""The decision-time model's unit costs (moetuner/online/decision_time.py), measured: each unit's operation
run as the policies run it, on the benchmark's setting, its process CPU time the median of `--repeats`
runs, divided by the units it counted. Then the model is checked against the measured CPU time of
migration_aware's and periodic's real decisions on a short replay.

    .venv/bin/python benchmarks/decision_cost.py --out docs/results/online/decision_cost

Prints the `decision_cost:` block for conf/online.yaml and writes `units.csv` (unit, seconds per unit,
spread of the repeats) and `check.csv` (per policy: decisions, median and range of model / measured) in
--out, with run.json; logs them to MLflow (experiment `benchmarks`, run `decision_cost`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from moetuner.online.decision_time import SOLVE, DecisionCost, work_between
from moetuner.online.migration import MigrationConfig
from moetuner.online.migration_aware import align_layer, local_moves, node_local_layer, sticky_layer
from moetuner.online.policies import Served
from moetuner.online.policy_config import make_policy
from moetuner.online.stream_replay import make_context, replay_stream
from moetuner.solvers.registry import solve_placement
from moetuner.topology import topology_from_config, topology_preset
from moetuner.tracking import tracked_run
from online_rebalance import conf, load, policy_configs  # benchmarks/online_rebalance.py
from table import command_line, markdown, write_csv, write_run_record  # benchmarks/table.py


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) process CPU seconds of `fn()` over `repeats` runs."""
    got = []
    for _ in range(repeats):
        tick = time.process_time()
        fn()
        got.append(time.process_time() - tick)
    return float(np.median(got)), min(got), max(got)


def unit_costs(ctx, stream, repeats: int, solvers: list[str], window_steps: int) -> list[dict]:
    """One row per unit: seconds per unit (median over repeats) and the repeats' range."""
    served = Served(stream, stream.num_steps)
    window = served.window(window_steps)
    load = served.loads(window).mean(0)  # [L, E]
    L = load.shape[0]
    current = ctx.solve_steps(window[: len(window) // 2], "eplb", {}).phy2log
    target = ctx.solve_steps(window, "eplb", {}).phy2log
    num_gpus, gpn, cost = ctx.topology.num_gpus, ctx.topology.gpus_per_node, ctx.step_times.cost
    problem = ctx.problem(stream.tokens_of(window[-1:]))
    object.__setattr__(problem, "load", stream.loads[window].sum(0, dtype=np.int64).astype(float))
    evaluated = sum(local_moves(current[l], load[l][None], num_gpus, cost.expert_time, 4)[1] for l in range(L))

    def priced() -> None:
        ctx.step_times.cache.clear()  # uncached: the simulator's work, as an engine would do it
        ctx.step_times.times(target, window)

    def candidates() -> None:
        for l in range(L):
            align_layer(current[l], target[l], num_gpus, gpn)
            align_layer(current[l], sticky_layer(current[l], load[l], num_gpus, gpn), num_gpus, gpn)
            align_layer(current[l], node_local_layer(current[l], load[l], num_gpus, gpn), num_gpus, gpn)

    work = {"priced_layer_steps": (priced, len(window) * L),
            "load_layer_steps": (lambda: served.loads(window), len(window) * L),
            "migration_layers": (lambda: ctx.migration_of(current, target), L),
            "proxy_slot_steps": (lambda: [local_moves(current[l], load[l][None], num_gpus, cost.expert_time, 4)
                                          for l in range(L)], evaluated),
            "candidate_layers": (candidates, 3 * L if ctx.topology.nodes > 1 else 2 * L),
            **{SOLVE + s: (lambda s=s: solve_placement(problem, s, {}), L) for s in solvers}}
    rows = []
    for unit, (fn, count) in work.items():
        median, low, high = timed(fn, repeats)
        rows.append({"unit": unit, "count": count, "seconds_per_unit": median / count,
                     "microseconds_per_unit": median / count * 1e6, "repeat_min_s": low, "repeat_median_s": median, "repeat_max_s": high})
        print(f"{unit}: {median / count:.3g} s per unit ({count} units, {low:.4f}-{high:.4f} s)", flush=True)
    return rows


def check(stream, profile, ctx, model: DecisionCost, policies: list[str], scale: float) -> list[dict]:
    """Per policy: the model's charge / the measured process CPU time of each real decision."""
    args = argparse.Namespace(policies=policies, static_solvers=[], offsets=[0], ma_grid=[], scale=scale)
    rows = []
    for label, cfg in policy_configs(args):
        policy, ratios = make_policy(cfg, stream), []
        decide = policy.decide

        def measured(c, step, served, current, decide=decide, ratios=ratios):
            before, tick = c.work_done(), time.process_time()
            got = decide(c, step, served, current)
            spent, work = time.process_time() - tick, work_between(before, c.work_done())
            if sum(work.values()) and spent > 0:
                ratios.append(model.seconds(work) / spent)
            return got

        policy.decide = measured
        replay_stream(stream, profile, policy, ctx)
        rows.append({"policy": label, "decisions": len(ratios), "model_over_measured_median": float(np.median(ratios)),
                     "model_over_measured_min": min(ratios), "model_over_measured_max": max(ratios)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", default="intent_law_intent")
    parser.add_argument("--setting", default="h200_2x8:1", help="topology:replicas")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--solvers", nargs="*", default=["eplb"], help="solve_layers.<solver> units to measure")
    parser.add_argument("--window-steps", type=int, default=1000, help="the measured operations' window")
    parser.add_argument("--check-scale", type=float, default=0.1, help="the check replay's --scale")
    parser.add_argument("--out", default="docs/results/online/decision_cost")
    args = parser.parse_args()
    started = time.perf_counter()
    topo_name, replicas = args.setting.split(":")
    stream, profile = load(args.stream, 1, 512)
    ctx = make_context(stream, topology_from_config(topology_preset(topo_name)), int(replicas), "dispatch_combine",
                       "dynamic", MigrationConfig(), DecisionCost({}))
    units = unit_costs(ctx, stream, args.repeats, args.solvers, args.window_steps)
    model = DecisionCost({r["unit"]: r["seconds_per_unit"] for r in units})
    short, short_profile = load(args.stream, 1, 512, args.check_scale)
    short_ctx = make_context(short, ctx.topology, int(replicas), "dispatch_combine", "dynamic", MigrationConfig(), model)
    checked = check(short, short_profile, short_ctx, model, ["periodic", "triggered", "migration_aware"],
                    args.check_scale)
    print(markdown(units, list(units[0]), ".4g"))
    print()
    print(markdown(checked, list(checked[0]), ".4g"))
    print("\ndecision_cost:   # conf/online.yaml")
    for r in units:
        if not r["unit"].startswith(SOLVE):
            print(f"  {r['unit']}: {r['seconds_per_unit']:.3g}")
    print("  solve_layers: {" + ", ".join(f"{r['unit'][len(SOLVE):]}: {r['seconds_per_unit']:.3g}"
                                         for r in units if r["unit"].startswith(SOLVE)) + "}")
    out = Path(args.out)
    with tracked_run("decision_cost", {"mlflow": {"experiment": "benchmarks"}, **vars(args)},
                     tags={"benchmark": "decision_cost"}) as run:
        run.log_metrics({r["unit"]: r["seconds_per_unit"] for r in units})
        for path in (write_csv(out / "units.csv", units, list(units[0])),
                     write_csv(out / "check.csv", checked, list(checked[0])),
                     write_run_record(out, command_line("decision_cost.py", sys.argv[1:]),
                                      f"{time.perf_counter() - started:.0f} s wall; process CPU time, medians of "
                                      f"{args.repeats}")):
            run.log_artifact(path)


if __name__ == "__main__":
    main()
