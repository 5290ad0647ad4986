"""Predicted layer time of every solver's placement on routing it was not computed from (ESFT traces).

    .venv/bin/python benchmarks/placement_quality.py --time-limit 8 --step-tokens 1024

Traces: ESFT DeepSeek-V2-Lite `intent` and `law` (../shared/data/esft-deepseek-v2-lite), each split by
sequence (30% held out, seed 0). Scenarios: profile split -> held-out split of the same domain, and
profile of one domain -> held-out split of the other. Topologies h100_1x8, h200_2x8, h100_4x8; replica
budgets 0 and 1. Every placement is scored by the simulator (dispatch-combine, balanced replicas);
speedups are vs contiguous without replicas. `oracle` is EPLB computed on the evaluation tokens
themselves (not a fair competitor: a reference for how much the profile can still give); `bound` is
the steptail compute lower bound on the evaluation steps. Prints a Markdown table, writes it as CSV and
logs every number to MLflow (experiment `benchmarks`, run `placement_quality`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moetuner import PROJECT_ROOT
from moetuner.apps.solve import solve_placement
from moetuner.importers.esft import DEFAULT_INFO, read_esft
from moetuner.placement.layout import contiguous_phy2log
from moetuner.placement.problem import PlacementProblem
from moetuner.placement.steptail import lower_bound, profile_steps
from moetuner.simulator import cost_model, primary_column, simulate
from moetuner.topology import Topology, topology_from_config, topology_preset
from moetuner.trace import Trace, split_by_sequence
from moetuner.tracking import tracked_run
from table import markdown, write_csv  # benchmarks/table.py

DATA = PROJECT_ROOT.parent / "shared" / "data" / "esft-deepseek-v2-lite"
DOMAINS = ("intent", "law")
TOPOLOGIES = ("h100_1x8", "h200_2x8", "h100_4x8")
SOLVERS = ("contiguous", "round_robin", "greedy", "eplb", "exflow", "moetuner", "steptail")


def load_topology(name: str) -> Topology:
    return topology_from_config(topology_preset(name))


def score(phy2log: np.ndarray, trace: Trace, topology: Topology, step_tokens: int, dataflow: str,
          policy: str) -> float:
    """Simulated mean step time (s) of a placement on `trace`."""
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    ids, primary = trace.topk_ids.astype(np.int64), primary_column(trace.topk_ids, trace.topk_weights)
    return simulate(phy2log, topology.num_gpus, ids, primary, trace.num_experts, cost, step_tokens,
                    dataflow, policy).metrics()["layer_time_s"]


def evaluation_bound(trace: Trace, topology: Topology, replicas: int, step_tokens: int) -> float:
    """steptail's compute lower bound on the evaluation steps."""
    problem = PlacementProblem(trace, topology, replicas=replicas, step_tokens=step_tokens)
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    return lower_bound(problem, cost, profile_steps(problem)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=8.0, help="steptail seconds per solve (default 8)")
    parser.add_argument("--mip-time-limit", type=float, default=1.0, help="moetuner seconds per MIP (default 1)")
    parser.add_argument("--step-tokens", type=int, default=1024, help="tokens per step (default 1024)")
    parser.add_argument("--dataflow", default="dispatch_combine", help="dispatch_combine | expert_to_expert")
    parser.add_argument("--policy", default="balanced", help="replica policy (default balanced)")
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--replicas", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--out", default="results/benchmarks/placement_quality.csv", help="CSV of the table")
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent: this benchmark needs the ESFT traces in ../shared/data")
    splits = {d: split_by_sequence(read_esft(DATA / d, DEFAULT_INFO), 0.3, seed=0) for d in DOMAINS}
    scenarios = [(p, e) for p in DOMAINS for e in DOMAINS]  # (profile domain, evaluation domain)
    options = {"time_limit_s": args.time_limit, "mip_solver": "highs", "gap_rel": 0.025,
               "dataflow": args.dataflow, "replica_policy": args.policy}
    config = {**{k: v for k, v in vars(args).items()}, "mlflow": {"experiment": "benchmarks"}}
    columns = ["profile", "eval", "topology", "replicas", "contiguous_us", *SOLVERS, "oracle", "steptail_us",
               "bound_us", "steptail_vs_bound", "steptail_vs_eplb"]
    rows = []
    with tracked_run("placement_quality", config, tags={"benchmark": "placement_quality"}) as run:
        for topo_name in tqdm(args.topologies, desc="topologies"):
            topology = load_topology(topo_name)
            base_phy = contiguous_phy2log(26, 64, topology.num_gpus, math.ceil(64 / topology.num_gpus))
            for replicas in args.replicas:
                placements = {}
                for domain in DOMAINS:
                    problem = PlacementProblem(splits[domain][0], topology, replicas=replicas,
                                               step_tokens=args.step_tokens)
                    for solver in SOLVERS:
                        solver_options = {**options, "time_limit_s": args.mip_time_limit} \
                            if solver == "moetuner" else options
                        placements[domain, solver] = solve_placement(problem, solver, solver_options).phy2log
                for prof, ev in scenarios:
                    held = splits[ev][1]
                    evaluate = lambda phy: score(phy, held, topology, args.step_tokens,  # noqa: E731
                                                 args.dataflow, args.policy)
                    base = evaluate(base_phy)
                    times = {s: evaluate(placements[prof, s]) for s in SOLVERS}
                    oracle = PlacementProblem(held, topology, replicas=replicas, step_tokens=args.step_tokens)
                    times["oracle"] = evaluate(solve_placement(oracle, "eplb", {}).phy2log)
                    bound = evaluation_bound(held, topology, replicas, args.step_tokens)
                    row = {"profile": prof, "eval": ev, "topology": topo_name, "replicas": replicas,
                           "contiguous_us": base * 1e6, **{s: base / t for s, t in times.items()},
                           "steptail_us": times["steptail"] * 1e6, "bound_us": bound * 1e6,
                           "steptail_vs_bound": times["steptail"] / bound,
                           "steptail_vs_eplb": times["eplb"] / times["steptail"]}
                    rows.append(row)
                    key = f"{prof}-{ev}.{topo_name}.r{replicas}"
                    run.log_metrics({f"{key}.{c}": row[c] for c in columns[4:]})
        print(markdown(rows, columns, ".3f"))
        write_csv(Path(args.out), rows, columns)
        run.log_artifact(Path(args.out))



if __name__ == "__main__":
    main()
