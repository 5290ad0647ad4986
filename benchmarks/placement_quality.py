"""Predicted step time of every solver's placement on routing it was not computed from (ESFT traces),
under every engine dispatch, and the aims of issue 9.

    .venv/bin/python benchmarks/placement_quality.py --max-moves 1200

Traces: ESFT DeepSeek-V2-Lite `intent` and `law` (shipped in data/esft/, data/README.md). Each is split
by sequence order: the first half of the sequences is the profile, the rest is held out (512-token
steps: 8 held-out steps of intent). Rows:
topology (h100_1x8, h200_2x8, h100_4x8) x replicas (0, 1) x dataflow (dispatch_combine, hierarchical;
one node has no inter-node hop, so h100_1x8 runs dispatch_combine only) x the dispatch the engine
uses when scoring (dynamic, static, lp, lp_comm). Columns: speedup vs contiguous (same slot budget,
same dispatch) on held-out `intent`, of placements solved on the `intent` profile, one column per
registered solver (moetuner.solvers.registry; the MoETuner ILPs only with --ilp): solvers that read no
dispatch are solved once, the `per_dispatch` ones (steptail) once per dispatch (for the dispatch it is
scored with). `bound_us` is the
simulator's lower bound (compute + communication, any placement and dispatch) on the held-out steps.
`fixed_bound_us` is the lower bound for one placement held fixed over those steps (any dispatch;
costmodel/placement_bound.py, one LP per layer; `--no-fixed-bound` skips it) and `<solver>_gap_to_bound`
each solver's time over it (a ratio >= 1; eplb and steptail here, all in benchmarks/placement_bound.py).
`lp` and `lp_comm` pay their per-batch decision (costmodel/charges.py, the default 100 us budget per
solve plus the counts all-gather). `steptail_ci_low`/`_high`: the paired bootstrap 95% interval of
steptail's speedup vs contiguous, `vs_eplb_ci_low`/`_high` of steptail's speedup over eplb
(costmodel/intervals.py, over the held-out steps).

The aims table, per topology x replicas x dataflow:
- `dyn_vs_eplb`: EPLB time / steptail time, both under dynamic;
- `lp_comm_vs_best_eplb`: EPLB's best time under an engine dispatch (dynamic, static, lp) / steptail
  solved for lp_comm and served with lp_comm;
- `robust_intent`, `robust_law`: steptail solved on both profiles (equal weights, robust=mean,
  dynamic) scored on each domain's held-out half; `worst_*` the same with robust=worst;
  `intent_on_law` and `law_on_intent`: single-domain steptail placements scored on the other domain;
  all as speedups vs the contiguous layout whose hot replicas (replicas=1) follow the two-domain
  profile;
- `gap`: steptail (dynamic) time / lower bound; `gap_to_bound`: the same over the fixed-placement bound.
The re-split table (`--split-seeds`, default 0-4), per topology x replicas x dataflow, dispatch dynamic:
intent re-split by sequence with each seed (`split_by_sequence`, half held out, as the study's
`split.seed`), EPLB and steptail solved on each split's profile and scored on its held-out steps.
`vs_eplb_min`/`_max`: steptail's speedup over EPLB in the worst and best split; `vs_eplb_split_low`/
`_high`: the 95% interval over splits (resampling splits, then steps: `split_speedup_interval`);
`verdict`: `faster` only when steptail beats EPLB in every split, else `not in every split`. Every
other interval in these tables is conditional on one split and one solve; this one on the trace only.
Prints Markdown tables, writes them as CSV (docs/results/placement_quality/, with run.json: command, date,
wall time; docs/simulator.md renders them with benchmarks/render_tables.py) and logs every number to
MLflow (experiment `benchmarks`, run `placement_quality`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moetuner import PROJECT_ROOT
from moetuner.solvers.registry import solve_placement, solver_names
from moetuner.solvers.problem import PlacementProblem
from moetuner.costmodel.cost import cost_model
from moetuner.costmodel.settings import DATAFLOWS, DISPATCHES
from moetuner.costmodel.bounds import lower_bound
from moetuner.costmodel.placement_bound import fixed_placement_bound
from moetuner.costmodel.intervals import beaten_in_every_split, speedup_interval, split_speedup_interval
import moetuner.costmodel.score as scoring
from moetuner.placement import expert_location
from moetuner.topology import Topology, topology_from_config, topology_preset
from moetuner.trace import Trace, load_trace, split_by_sequence
from moetuner.tracking import tracked_run
from table import command_line, markdown, write_csv, write_run_record  # benchmarks/table.py

DATA = PROJECT_ROOT / "data" / "esft"
DOMAINS = ("intent", "law")
TOPOLOGIES = ("h100_1x8", "h200_2x8", "h100_4x8")
DEFAULT_DATAFLOWS = ("dispatch_combine", "hierarchical")
ENGINE_DISPATCHES = ("dynamic", "static", "lp")  # what engines ship (lp_comm is ours)
SLOW_SOLVERS = ("moetuner", "metro")  # only with --ilp (MIPs per layer)


def first_part(trace: Trace, fraction: float = 0.5) -> tuple[Trace, Trace]:
    """(profile, held-out): the first `fraction` of the sequences in trace order, and the rest."""
    seqs = trace.sequences
    cut = min(len(seqs) - 1, max(1, round(fraction * len(seqs))))
    return trace.select_sequences(seqs[:cut], ":profile"), trace.select_sequences(seqs[cut:], ":heldout")


def step_times(phy2log: np.ndarray, trace: Trace, topology: Topology, step_tokens: int, dataflow: str,
               dispatch: str) -> np.ndarray:
    """Simulated seconds of every step of `trace` (lp and lp_comm charged for their decision). [S]"""
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    return scoring.score(expert_location(phy2log, topology.num_gpus, trace.num_experts), trace.topk_ids,
                         trace.topk_weights, cost, step_tokens, dataflow, dispatch).step_s


def score(phy2log: np.ndarray, trace: Trace, topology: Topology, step_tokens: int, dataflow: str,
          dispatch: str) -> float:
    """Simulated mean step time (s) of a placement on `trace`."""
    return float(step_times(phy2log, trace, topology, step_tokens, dataflow, dispatch).mean())


def bound(trace: Trace, topology: Topology, slots_per_gpu: int, step_tokens: int, dataflow: str) -> float:
    """The simulator's lower bound on `trace`'s steps."""
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    return lower_bound(trace.topk_ids, cost, slots_per_gpu, step_tokens, dataflow)


def fixed_bound(trace: Trace, topology: Topology, slots_per_gpu: int, step_tokens: int, dataflow: str) -> float:
    """The fixed-placement lower bound on `trace`'s steps (one placement for all of them, any dispatch)."""
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    return fixed_placement_bound(trace.topk_ids, cost, slots_per_gpu, step_tokens, dataflow).step_s


SPLIT_COLUMNS = ["topology", "replicas", "dataflow", "splits", "vs_eplb_min", "vs_eplb_max", "vs_eplb_split_low",
                 "vs_eplb_split_high", "verdict"]


def split_row(trace: Trace, seeds: list[int], topology: Topology, replicas: int, dataflow: str, step_tokens: int,
              options: dict) -> dict:
    """steptail vs EPLB (dispatch dynamic) over re-splits of `trace` by sequence, one per seed."""
    eplb_s, ours_s = [], []
    for seed in seeds:
        profile, held = split_by_sequence(trace, 0.5, seed)
        problem = PlacementProblem(profile, topology, replicas=replicas, step_tokens=step_tokens, dataflow=dataflow)
        for solver, out in (("eplb", eplb_s), ("steptail", ours_s)):
            out.append(step_times(solve_placement(problem, solver, options).phy2log, held, topology, step_tokens,
                                  dataflow, "dynamic"))
    per_split = [e.mean() / o.mean() for e, o in zip(eplb_s, ours_s)]
    low, high = split_speedup_interval(eplb_s, ours_s)
    return {"splits": len(seeds), "vs_eplb_min": min(per_split), "vs_eplb_max": max(per_split),
            "vs_eplb_split_low": low, "vs_eplb_split_high": high,
            "verdict": "faster" if beaten_in_every_split(per_split) else "not in every split"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-moves", type=int, default=1200,
                        help="steptail's work budget per solve (default 1200, the default study's)")
    parser.add_argument("--step-tokens", type=int, default=512, help="tokens per step (default 512)")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--replicas", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--dataflows", nargs="*", default=list(DEFAULT_DATAFLOWS), choices=DATAFLOWS)
    parser.add_argument("--ilp", action="store_true", help="also the MoETuner ILPs (1 s per MIP; slow)")
    parser.add_argument("--no-fixed-bound", dest="fixed_bound", action="store_false",
                        help="skip the fixed-placement bound (4-33 s per row on 2 shared cores)")
    parser.add_argument("--split-seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4],
                        help="re-splits of intent by sequence for the re-split table (default 0-4; none: skip)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "results" / "placement_quality"
                                             / "placement_quality.csv"), help="CSV of the table")
    parser.add_argument("--note", default="", help="what to say about the machine (e.g. 2 shared cores)")
    args = parser.parse_args()
    started = time.time()
    splits = {d: first_part(load_trace(DATA / f"{d}.safetensors")) for d in DOMAINS}
    (profile, held), (law_profile, law_held) = splits["intent"], splits["law"]
    fixed_solvers = [s for s in solver_names(per_dispatch=False) if args.ilp or s not in SLOW_SOLVERS]
    baselines = [s for s in fixed_solvers if s != "contiguous"]  # contiguous is the reference
    assert solver_names(per_dispatch=True) == ("steptail",), "the rows below solve only steptail per dispatch"
    options = {"max_moves": args.max_moves, "mip_solver": "highs", "gap_rel": 0.025}
    mip_options = {**options, "max_nodes": 0}  # what the former 1 s per MIP reached: no node past the root
    config = {**vars(args), "mlflow": {"experiment": "benchmarks"}}
    columns = ["topology", "replicas", "dataflow", "dispatch", "contiguous_us", *baselines, "steptail",
               "steptail_ci_low", "steptail_ci_high", "steptail_vs_eplb", "vs_eplb_ci_low", "vs_eplb_ci_high",
               "bound_us", "steptail_vs_bound", "fixed_bound_us", "eplb_gap_to_bound", "steptail_gap_to_bound"]
    aim_columns = ["topology", "replicas", "dataflow", "dyn_vs_eplb", "lp_comm_vs_best_eplb", "robust_intent",
                   "robust_law", "worst_intent", "worst_law", "intent_on_law", "law_on_intent", "gap",
                   "gap_to_bound"]
    rows, aims, split_rows = [], [], []
    grid = [(t, r, f) for t in args.topologies for r in args.replicas for f in args.dataflows
            if not (f == "hierarchical" and topology_from_config(topology_preset(t)).nodes == 1)]
    with tracked_run("placement_quality", config, tags={"benchmark": "placement_quality"}) as run:
        for topo_name, replicas, dataflow in tqdm(grid, desc="rows"):
            topology = topology_from_config(topology_preset(topo_name))
            problem = lambda traces, dispatch, **kw: PlacementProblem.from_traces(  # noqa: E731
                traces, topology, replicas=replicas, step_tokens=args.step_tokens, dispatch=dispatch,
                dataflow=dataflow, **kw)
            base = problem([profile], "dynamic")
            fixed = {s: solve_placement(base, s, mip_options if s in SLOW_SOLVERS else options).phy2log
                     for s in fixed_solvers}
            ours = {d: solve_placement(problem([profile], d), "steptail", options).phy2log for d in DISPATCHES}
            times, steps = {}, {}  # (placement, dispatch) -> held-out intent seconds (mean, per step)
            lb = bound(held, topology, base.slots_per_gpu, args.step_tokens, dataflow)
            fixed_lb = (fixed_bound(held, topology, base.slots_per_gpu, args.step_tokens, dataflow)
                        if args.fixed_bound else float("nan"))
            for dispatch in DISPATCHES:
                run_on = lambda phy: step_times(phy, held, topology, args.step_tokens, dataflow, dispatch)  # noqa: E731
                for name, phy in fixed.items():
                    steps[name, dispatch] = run_on(phy)
                steps["steptail", dispatch] = run_on(ours[dispatch])
                times.update({key: float(s.mean()) for key, s in steps.items()})
                contiguous = times["contiguous", dispatch]
                ci = speedup_interval(steps["contiguous", dispatch], steps["steptail", dispatch])
                vs_eplb = speedup_interval(steps["eplb", dispatch], steps["steptail", dispatch])
                row = {"topology": topo_name, "replicas": replicas, "dataflow": dataflow, "dispatch": dispatch,
                       "contiguous_us": contiguous * 1e6,
                       **{s: contiguous / times[s, dispatch] for s in (*baselines, "steptail")},
                       "steptail_ci_low": ci[0], "steptail_ci_high": ci[1],
                       "vs_eplb_ci_low": vs_eplb[0], "vs_eplb_ci_high": vs_eplb[1],
                       "steptail_vs_eplb": times["eplb", dispatch] / times["steptail", dispatch],
                       "bound_us": lb * 1e6, "steptail_vs_bound": times["steptail", dispatch] / lb,
                       "fixed_bound_us": fixed_lb * 1e6, "eplb_gap_to_bound": times["eplb", dispatch] / fixed_lb,
                       "steptail_gap_to_bound": times["steptail", dispatch] / fixed_lb}
                rows.append(row)
                key = f"{topo_name}.r{replicas}.{dataflow}.{dispatch}"
                run.log_metrics({f"{key}.{c}": row[c] for c in columns[4:]})
            # cross-domain: one placement from both profiles, scored on each domain's held-out half, vs
            # the contiguous layout whose hot replicas follow the same two-domain profile
            both = problem([profile, law_profile], "dynamic")
            robust = solve_placement(both, "steptail", options).phy2log
            worst = solve_placement(problem([profile, law_profile], "dynamic", robust="worst"), "steptail",
                                    options).phy2log
            law_only = solve_placement(problem([law_profile], "dynamic"), "steptail", options).phy2log
            on = lambda phy, trace: score(phy, trace, topology, args.step_tokens, dataflow, "dynamic")  # noqa: E731
            reference = solve_placement(both, "contiguous", {}).phy2log
            ref_intent, ref_law = on(reference, held), on(reference, law_held)
            aim = {"topology": topo_name, "replicas": replicas, "dataflow": dataflow,
                   "dyn_vs_eplb": times["eplb", "dynamic"] / times["steptail", "dynamic"],
                   "lp_comm_vs_best_eplb": min(times["eplb", d] for d in ENGINE_DISPATCHES)
                   / times["steptail", "lp_comm"],
                   "robust_intent": ref_intent / on(robust, held), "robust_law": ref_law / on(robust, law_held),
                   "worst_intent": ref_intent / on(worst, held), "worst_law": ref_law / on(worst, law_held),
                   "intent_on_law": ref_law / on(ours["dynamic"], law_held),
                   "law_on_intent": ref_intent / on(law_only, held),
                   "gap": times["steptail", "dynamic"] / lb, "gap_to_bound": times["steptail", "dynamic"] / fixed_lb}
            aims.append(aim)
            if args.split_seeds:
                split_rows.append({"topology": topo_name, "replicas": replicas, "dataflow": dataflow,
                                   **split_row(load_trace(DATA / "intent.safetensors"), args.split_seeds, topology,
                                               replicas, dataflow, args.step_tokens, options)})
            run.log_metrics({f"{topo_name}.r{replicas}.{dataflow}.aim.{c}": aim[c] for c in aim_columns[3:]})
        print(markdown(rows, columns, ".3f"))
        print()
        print(markdown(aims, aim_columns, ".3f"))
        print()
        print(markdown(split_rows, SPLIT_COLUMNS, ".4f"))
        out = Path(args.out)
        if split_rows:
            write_csv(out.with_name(out.stem + "_splits.csv"), split_rows, SPLIT_COLUMNS)
        write_csv(out, rows, columns)
        write_csv(out.with_name(out.stem + "_aims.csv"), aims, aim_columns)
        write_run_record(out.parent, command_line("placement_quality.py", sys.argv[1:]),
                         f"{time.time() - started:.0f} s wall, {len(grid)} rows"
                         + (f"; {args.note}" if args.note else ""))
        run.log_artifact(out)
        run.log_artifact(out.with_name(out.stem + "_aims.csv"))


if __name__ == "__main__":
    main()
