"""Solve time and optimality gap of the placement solvers from Mixtral to DeepSeek-V3 scale.

    .venv/bin/python benchmarks/solver_scale.py --time-limit 2 --tokens 4096
    .venv/bin/python benchmarks/solver_scale.py --esft ESFT/results/expert_scores  # raw intent/ and law/ dumps
    .venv/bin/python benchmarks/solver_scale.py --cases dsv3-g64 --replicas 1 --steptail-time-limit 45

Synthetic traces (moetuner.synth: Zipf skew 1.0, inter-layer affinity 0.3) with each model's shape;
every solver gets the same per-MIP time limit; steptail gets --steptail-time-limit for its whole
solve. With --esft: the real DeepSeek-V2-Lite routing instead, solved on 70% of the `intent`
sequences and scored (profile-token imbalance per GPU) on the held-out 30% and on the `law` task.
Prints a Markdown table, writes it as CSV and logs every number to MLflow (experiment `benchmarks`,
run `solver_scale`).
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from moetuner.solvers.registry import placement_metrics, solve_placement
from moetuner.importers import import_routing
from moetuner.placement import Placement
from moetuner.solvers.problem import PlacementProblem
from moetuner.synth import SynthSpec, synthesize
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import split_by_sequence
from moetuner.tracking import tracked_run
from table import markdown, write_csv  # benchmarks/table.py


@dataclass(frozen=True)
class Case:
    model: str
    experts: int
    layers: int
    top_k: int
    nodes: int
    gpus_per_node: int

    @property
    def name(self) -> str:
        return f"{self.model}-g{self.nodes * self.gpus_per_node}"


CASES = [
    Case("mixtral", 8, 32, 2, 1, 4), Case("mixtral", 8, 32, 2, 1, 8), Case("mixtral", 8, 32, 2, 2, 8),
    Case("dsv2lite", 64, 26, 6, 1, 8), Case("dsv2lite", 64, 26, 6, 2, 8), Case("dsv2lite", 64, 26, 6, 4, 8),
    Case("dsv3", 256, 58, 8, 8, 8),
]
COLUMNS = ["case", "E", "L", "G", "solver", "status", "seconds", "objective", "bound", "gap", "imbalance"]
HELDOUT_COLUMNS = ["replicas", "solver", "status", "seconds", "imbalance", "heldout_imbalance", "law_imbalance"]
ALL_SOLVERS = ["contiguous", "round_robin", "greedy", "eplb", "exflow", "moetuner"]


def h100_cluster(nodes: int, gpus_per_node: int) -> dict:
    """The H100 preset (conf/topology/h100_1x8.yaml) resized to nodes x gpus_per_node."""
    preset = topology_preset("h100_1x8")
    return {**preset, "name": f"h100_{nodes}x{gpus_per_node}", "nodes": nodes, "gpus_per_node": gpus_per_node}


def solvers() -> list[str]:
    """The solvers compared; steptail joins when its module is installed."""
    names = ["greedy", "eplb", "moetuner"]
    return names + ["steptail"] if importlib.util.find_spec("moetuner.solvers.steptail") else names


def make_problem(case: Case, tokens: int, replicas: int) -> PlacementProblem:
    """A synthetic trace of the case's model shape on its H100 cluster."""
    trace = synthesize(SynthSpec(num_tokens=tokens, num_layers=case.layers, num_experts=case.experts,
                                 top_k=case.top_k, skew=1.0, affinity=0.3, seed=0, model=case.model))
    return PlacementProblem(trace, topology_from_config(h100_cluster(case.nodes, case.gpus_per_node)),
                            replicas=replicas)


def solve(problem: PlacementProblem, solver: str, time_limit: float,
          steptail_time_limit: float | None = None) -> tuple[Placement, dict]:
    """Solve with the benchmark's MIP settings; the placement and its metrics on the profile."""
    if solver == "steptail" and steptail_time_limit is not None:
        time_limit = steptail_time_limit
    placement = solve_placement(problem, solver, {"time_limit_s": time_limit, "mip_solver": "highs",
                                                  "gap_rel": 0.025, "equal_cluster_size": True})
    return placement, placement_metrics(placement, problem.load)


def run_case(case: Case, problem: PlacementProblem, solver: str, time_limit: float,
             steptail_time_limit: float | None = None) -> dict:
    """Solve one case with one solver; a table row."""
    placement, metrics = solve(problem, solver, time_limit, steptail_time_limit)
    return {"case": case.name, "E": case.experts, "L": case.layers, "G": problem.num_gpus, "solver": solver,
            "status": placement.status, "seconds": metrics["solve_seconds"], "objective": metrics["objective"],
            "bound": metrics["bound"], "gap": metrics["gap"], "imbalance": metrics["imbalance"]}


def esft_rows(folder: Path, time_limit: float) -> list[dict]:
    """Real routing: solve on 70% of `intent` (h200_2x8), score on its held-out 30% and on `law`."""
    profile, heldout = split_by_sequence(import_routing("esft", folder / "intent"), 0.3, seed=0)
    law = import_routing("esft", folder / "law")
    topology = topology_from_config(topology_preset("h200_2x8"))
    rows = []
    for replicas in (0, 1):
        problem = PlacementProblem(profile, topology, replicas=replicas)
        for solver in tqdm(ALL_SOLVERS, desc=f"esft replicas={replicas}"):
            placement, metrics = solve(problem, solver, time_limit)
            scores = [placement_metrics(placement, PlacementProblem(t, topology, replicas).load)["imbalance"]
                      for t in (heldout, law)]
            rows.append({"replicas": replicas, "solver": solver, "status": placement.status,
                         "seconds": metrics["solve_seconds"], "imbalance": metrics["imbalance"],
                         "heldout_imbalance": scores[0], "law_imbalance": scores[1]})
    return rows



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=2.0, help="safety cap in seconds per MIP (default 2; the work budget is the "
                        "solver's default max_nodes, and the placement's budget_bound_by says which bound)")
    parser.add_argument("--tokens", type=int, default=4096, help="profile tokens per trace (default 4096)")
    parser.add_argument("--replicas", type=int, default=0, help="extra slots per GPU (default 0)")
    parser.add_argument("--steptail-time-limit", type=float, default=None,
                        help="steptail's safety cap on its search in seconds (default: --time-limit; its "
                             "budget is the default max_moves)")
    parser.add_argument("--solvers", nargs="*", default=None,
                        help="solver names (default greedy eplb moetuner steptail)")
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default all), e.g. mixtral-g4")
    parser.add_argument("--esft", type=Path, default=None, help="ESFT DeepSeek-V2-Lite folder: held-out mode")
    parser.add_argument("--out", default="results/benchmarks/solver_scale.csv", help="CSV of the table")
    args = parser.parse_args()
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    config = {"time_limit_s": args.time_limit, "steptail_time_limit_s": args.steptail_time_limit,
              "tokens": args.tokens, "replicas": args.replicas,
              "cases": [c.name for c in cases], "esft": str(args.esft), "mlflow": {"experiment": "benchmarks"}}
    with tracked_run("solver_scale", config, tags={"benchmark": "solver_scale"}) as run:
        if args.esft:
            rows, columns = esft_rows(args.esft, args.time_limit), HELDOUT_COLUMNS
            keys = [f"esft.r{row['replicas']}.{row['solver']}" for row in rows]
        else:
            rows, columns, keys = [], COLUMNS, []
            for case in tqdm(cases, desc="cases"):
                problem = make_problem(case, args.tokens, args.replicas)
                for solver in args.solvers or solvers():
                    rows.append(run_case(case, problem, solver, args.time_limit, args.steptail_time_limit))
                    keys.append(f"{case.name}.{solver}")
        for key, row in zip(keys, rows):
            run.log_metrics({f"{key}.{k}": v for k, v in row.items()})  # numbers only; strings are skipped
        print(markdown(rows, columns))
        write_csv(Path(args.out), rows, columns)
        run.log_artifact(Path(args.out))


if __name__ == "__main__":
    main()
