"""Placement per serving phase (moetuner/phase.py) on the v2_lite deployment (conf/deployment/v2_lite.yaml), and a
V3-shaped EP144 decode solve timed.

    nice .venv/bin/python benchmarks/phases.py                      # every section
    nice .venv/bin/python benchmarks/phases.py --sections splits --phases decode --traces intent --max-moves 130 \
        --out docs/results/phases/decode_intent        # and --traces law ... decode_law
    nice .venv/bin/python benchmarks/phases.py --sections splits --phases prefill --prefill-steps 1 \
        --max-moves 130 --out docs/results/phases/prefill
    nice .venv/bin/python benchmarks/phases.py --sections regime --out docs/results/phases/regime
    nice .venv/bin/python benchmarks/phases.py --sections v3 --out docs/results/phases/v3
(the committed results: one folder per run, each with its run.json).

Sections, each writing its CSV under docs/results/phases/ (and run.json, the command and a note):
- `splits` (phases_splits.csv, phases_summary.csv): for each shipped ESFT trace (intent, law) and each re-split by
  sequence (`--split-seeds`, half held out), per phase on its unit (prefill: h800_1x8, 9 slots per GPU, normal
  kernels; decode: h800_4x8, 3 slots per GPU, low-latency kernels), EPLB (`solver=eplb` as SGLang runs it: the
  model's n_group), the METRO-style `metro` and `steptail`, each solved on the profile half's phase steps and scored
  on the held-out half's phase steps (dispatch dynamic). Per split: each solver's mean step time and steptail's
  speedup over EPLB and metro (`vs_eplb`, `vs_metro`: rival time / steptail time). Summary per trace x phase: mean,
  min and max over splits, the 95% interval over splits (`split_speedup_interval`: resampling splits, then steps)
  and every solver's `gap_to_bound` (its time over the fixed-placement lower bound, costmodel/placement_bound.py)
  on split `--bound-seed`'s held-out steps. `aim`: steptail >= 1.03x faster than both rivals with both intervals
  above 1 (issue's decode aim).
- `regime` (phases_regime.csv): intent split with `--bound-seed`, per phase on its unit, tokens per rank 1 to
  4096: EPLB, metro and steptail (a small budget: `--regime-moves`, EPLB and metro warm starts, one search step) solved at
  that size and scored on the held-out steps; `winner` is the fastest (ties joined by ' = ').
- `v3` (phases_v3.csv): a synthetic V3-shaped trace (moetuner-synth's deepseek_v3 shape, `--v3-tokens` tokens,
  skew 1.0, affinity 0.3), the v3 deployment's EP144 decode unit (h800_18x8, 2 slots per GPU, 4 steps of 18432
  tokens): steptail with its default options (3000 moves; or `--v3-moves N` with EPLB as its only warm start and one
  search step), the wall seconds of the solve.

Steps: prefill steps hold whole sequences (32768 tokens per step on 8 GPUs: the trace's sequences recur in
every step), decode steps 4096 tokens drawn across sequences (each sequence about 32 times per step: requests
recur). Steptail's budget here is `--max-moves` (default 260, below its default 3000, to keep the run short on 2
shared cores), scored on every profile step.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # threaded BLAS on shared cores made small products 50x slower

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from moetuner import PROJECT_ROOT  # noqa: E402
from moetuner.costmodel.intervals import split_speedup_interval  # noqa: E402
from moetuner.deployment import Unit, deployment_from_config  # noqa: E402
from moetuner.phase import phase_trace  # noqa: E402
from moetuner.solvers.problem import PlacementProblem  # noqa: E402
from moetuner.solvers.registry import solve_placement  # noqa: E402
from moetuner.synth import SynthSpec, synthesize  # noqa: E402
from moetuner.trace import Trace, load_trace, split_by_sequence  # noqa: E402
from placement_quality import DATA, fixed_bound, step_times  # noqa: E402  benchmarks/placement_quality.py
from table import command_line, markdown, write_csv, write_run_record  # noqa: E402  benchmarks/table.py

OUT = PROJECT_ROOT / "docs" / "results" / "phases"
SOLVERS = ("eplb", "metro", "steptail")
RIVALS = ("eplb", "metro")
AIM = 1.03
TOKENS_PER_RANK = (1, 4, 16, 64, 256, 1024, 4096)
SPLIT_COLUMNS = ["trace", "phase", "topology", "seed", "eplb_us", "metro_us", "steptail_us", "vs_eplb", "vs_metro",
                 "steptail_seconds"]
SUMMARY_COLUMNS = ["trace", "phase", "topology", "tokens_per_rank", "splits", "vs_eplb_mean", "vs_eplb_min",
                   "vs_eplb_max", "vs_eplb_low", "vs_eplb_high", "vs_metro_mean", "vs_metro_min", "vs_metro_max",
                   "vs_metro_low", "vs_metro_high", "eplb_gap_to_bound", "metro_gap_to_bound",
                   "steptail_gap_to_bound", "aim"]
REGIME_COLUMNS = ["phase", "topology", "tokens_per_rank", "eplb_us", "metro_us", "steptail_us", "steptail_vs_eplb",
                  "metro_vs_eplb", "winner"]
V3_COLUMNS = ["trace", "phase", "topology", "gpus", "slots_per_gpu", "tokens_per_step", "steps", "max_moves",
              "moves", "solve_seconds", "under_2_min"]


def v2_lite_units(decode_steps: int, prefill_steps: int) -> dict[str, Unit]:
    """The v2_lite deployment's units with the benchmark's step counts."""
    cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "deployment" / "v2_lite.yaml")
    units = deployment_from_config(cfg).units
    steps = {"prefill": prefill_steps, "decode": decode_steps}
    return {name: replace(unit, phase=replace(unit.phase, num_steps=steps[name])) for name, unit in units.items()}


def solve_and_score(profile: Trace, held: Trace, unit: Unit, options: dict[str, dict]
                    ) -> tuple[dict[str, np.ndarray], dict[str, float], Trace]:
    """Per solver, the held-out phase steps' times [S] and solve seconds; and the held-out step trace."""
    topology, phase = unit.topology, unit.phase
    steps, dataflow = phase.step_tokens(topology), phase.dataflow_on(topology)
    problem = PlacementProblem(phase_trace(profile, phase, topology), topology,
                               replicas=unit.replicas(profile.num_experts), step_tokens=steps, dataflow=dataflow)
    held_steps = phase_trace(held, phase, topology)
    times, seconds = {}, {}
    for solver in SOLVERS:
        placement = solve_placement(problem, solver, options.get(solver, {}))
        times[solver] = step_times(placement.phy2log, held_steps, topology, steps, dataflow, "dynamic")
        seconds[solver] = float(placement.solve_seconds)
    return times, seconds, held_steps


def summary_row(trace: str, name: str, unit: Unit, per_split: list[dict[str, np.ndarray]],
                gaps: dict[str, float]) -> dict:
    """Mean, min, max and the interval over splits of steptail's speedup over each rival."""
    row = {"trace": trace, "phase": name, "topology": unit.topology.name, "tokens_per_rank": unit.phase.tokens_per_rank,
           "splits": len(per_split), **{f"{s}_gap_to_bound": gaps.get(s) for s in SOLVERS}}
    for rival in RIVALS:
        ratios = [t[rival].mean() / t["steptail"].mean() for t in per_split]
        low, high = split_speedup_interval([t[rival] for t in per_split], [t["steptail"] for t in per_split])
        row.update({f"vs_{rival}_mean": float(np.mean(ratios)), f"vs_{rival}_min": min(ratios),
                    f"vs_{rival}_max": max(ratios), f"vs_{rival}_low": low, f"vs_{rival}_high": high})
    met = all(row[f"vs_{r}_mean"] >= AIM and row[f"vs_{r}_low"] > 1.0 for r in RIVALS)
    row["aim"] = "met" if met else "not met"
    return row


def splits_section(args: argparse.Namespace, out: Path) -> tuple[list[dict], list[dict]]:
    """Per-split rows and per trace x phase summaries (module docstring), written to `out` as they come."""
    units = v2_lite_units(args.decode_steps, args.prefill_steps)
    options = {"steptail": {"max_moves": args.max_moves, "max_search_steps": max(args.decode_steps, args.prefill_steps)}}
    rows, summaries = [], []
    for trace_name in args.traces:
        trace = load_trace(DATA / f"{trace_name}.safetensors")
        for name, unit in ((n, u) for n, u in units.items() if n in args.phases):
            per_split, gaps = [], {}
            for seed in args.split_seeds:
                profile, held = split_by_sequence(trace, 0.5, seed)
                times, seconds, held_steps = solve_and_score(profile, held, unit, options)
                per_split.append(times)
                us = {s: float(times[s].mean()) * 1e6 for s in SOLVERS}
                rows.append({"trace": trace_name, "phase": name, "topology": unit.topology.name, "seed": seed,
                             **{f"{s}_us": us[s] for s in SOLVERS}, "vs_eplb": us["eplb"] / us["steptail"],
                             "vs_metro": us["metro"] / us["steptail"], "steptail_seconds": seconds["steptail"]})
                print(markdown(rows[-1:], SPLIT_COLUMNS, ".4f"), flush=True)
                write_csv(out / "phases_splits.csv", rows, SPLIT_COLUMNS)  # a stopped run keeps its splits
                if seed == args.bound_seed and args.bound:
                    topo, phase = unit.topology, unit.phase
                    lb = fixed_bound(held_steps, topo, unit.slots_per_gpu, phase.step_tokens(topo),
                                     phase.dataflow_on(topo))
                    gaps = {s: float(times[s].mean()) / lb for s in SOLVERS}
            summaries.append(summary_row(trace_name, name, unit, per_split, gaps))
            print(markdown(summaries[-1:], SUMMARY_COLUMNS, ".4f"), flush=True)
            write_csv(out / "phases_summary.csv", summaries, SUMMARY_COLUMNS)
    return rows, summaries


def winners(us: dict[str, float]) -> str:
    """The fastest solver(s) of {solver: time}, ties (within 1e-9 relative) joined by ' = '."""
    best = min(us.values())
    return " = ".join(s for s in SOLVERS if us[s] <= best * (1 + 1e-9))


def regime_section(args: argparse.Namespace, out: Path) -> list[dict]:
    """Which objective wins at each tokens per rank, per phase (module docstring), written to `out` as they come."""
    units = v2_lite_units(args.regime_steps, args.regime_steps)
    profile, held = split_by_sequence(load_trace(DATA / "intent.safetensors"), 0.5, args.bound_seed)
    options = {"steptail": {"max_moves": args.regime_moves, "warm_starts": ["eplb", "metro"], "max_search_steps": 1}}
    rows = []
    for name, unit in units.items():
        for tokens in args.tokens_per_rank:
            sized = replace(unit, phase=replace(unit.phase, tokens_per_rank=tokens))
            times = solve_and_score(profile, held, sized, options)[0]
            us = {s: float(times[s].mean()) * 1e6 for s in SOLVERS}
            rows.append({"phase": name, "topology": unit.topology.name, "tokens_per_rank": tokens,
                         **{f"{s}_us": us[s] for s in SOLVERS}, "steptail_vs_eplb": us["eplb"] / us["steptail"],
                         "metro_vs_eplb": us["eplb"] / us["metro"], "winner": winners(us)})
            print(markdown(rows[-1:], REGIME_COLUMNS, ".4f"), flush=True)
            write_csv(out / "phases_regime.csv", rows, REGIME_COLUMNS)
    return rows


def v3_section(args: argparse.Namespace) -> list[dict]:
    """A V3-shaped EP144 decode solve with steptail, timed (module docstring)."""
    shape = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "synth_shape" / "deepseek_v3.yaml"))
    spec = SynthSpec(**{k: v for k, v in shape.items() if k in SynthSpec.__dataclass_fields__},
                     num_tokens=args.v3_tokens, skew=1.0, affinity=0.3, coactivation=0.3).check()
    trace = synthesize(spec)
    unit = deployment_from_config(OmegaConf.load(PROJECT_ROOT / "conf" / "deployment" / "v3.yaml")).units["decode"]
    topology, phase = unit.topology, unit.phase
    problem = PlacementProblem(phase_trace(trace, phase, topology), topology, replicas=unit.replicas(trace.num_experts),
                               step_tokens=phase.step_tokens(topology), dataflow=phase.dataflow_on(topology))
    options = {} if args.v3_moves is None else {"max_moves": args.v3_moves, "warm_starts": ["eplb"],
                                                "max_search_steps": 1}
    start = time.perf_counter()
    placement = solve_placement(problem, "steptail", options)
    seconds = time.perf_counter() - start
    row = {"trace": f"synthetic V3 ({args.v3_tokens} tokens)", "phase": "decode", "topology": topology.name,
           "gpus": topology.num_gpus, "slots_per_gpu": unit.slots_per_gpu, "tokens_per_step": problem.step_tokens,
           "steps": phase.num_steps, "max_moves": placement.extra["max_moves"], "moves": placement.extra["moves"],
           "solve_seconds": seconds, "under_2_min": "yes" if seconds < 120 else "no"}
    print(markdown([row], V3_COLUMNS, ".1f"), flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["splits", "regime", "v3"], choices=["splits", "regime", "v3"])
    parser.add_argument("--phases", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"],
                        help="phases of `splits`")
    parser.add_argument("--traces", nargs="+", default=["intent", "law"], choices=["intent", "law"])
    parser.add_argument("--split-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--bound-seed", type=int, default=0, help="split whose held-out steps get the bound")
    parser.add_argument("--no-bound", dest="bound", action="store_false", help="skip gap_to_bound")
    parser.add_argument("--decode-steps", type=int, default=4, help="decode steps per split half (4096 tokens each)")
    parser.add_argument("--prefill-steps", type=int, default=2, help="prefill steps per split half (32768 tokens each)")
    parser.add_argument("--max-moves", type=int, default=260, help="steptail's work budget in `splits`")
    parser.add_argument("--tokens-per-rank", nargs="+", type=int, default=list(TOKENS_PER_RANK))
    parser.add_argument("--regime-steps", type=int, default=2, help="steps per size in `regime`")
    parser.add_argument("--regime-moves", type=int, default=52, help="steptail's work budget in `regime`")
    parser.add_argument("--v3-moves", type=int, default=None,
                        help="steptail's budget in `v3`, with EPLB as its only warm start and one search step "
                             "(default: steptail's default options)")
    parser.add_argument("--v3-tokens", type=int, default=32768, help="tokens of the synthetic V3 trace")
    parser.add_argument("--out", default=str(OUT), help="folder of the CSVs and run.json")
    parser.add_argument("--note", default="", help="what to say about the machine (e.g. 2 shared cores)")
    args = parser.parse_args()
    out, started = Path(args.out), time.time()
    if "splits" in args.sections:
        rows, summaries = splits_section(args, out)
        print(markdown(rows, SPLIT_COLUMNS, ".4f"), "\n", markdown(summaries, SUMMARY_COLUMNS, ".4f"))
    if "regime" in args.sections:
        print(markdown(regime_section(args, out), REGIME_COLUMNS, ".4f"))
    if "v3" in args.sections:
        write_csv(out / "phases_v3.csv", v3_section(args), V3_COLUMNS)
    write_run_record(out, command_line("phases.py", sys.argv[1:]),
                     f"{time.time() - started:.0f} s wall ({', '.join(args.sections)})" + (f"; {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
