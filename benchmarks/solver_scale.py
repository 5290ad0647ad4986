"""Solve time and optimality gap of the placement solvers from Mixtral to DeepSeek-V3 scale.

    .venv/bin/python benchmarks/solver_scale.py --time-limit 2 --tokens 4096

Synthetic traces (moetuner.synth: Zipf skew 1.0, inter-layer affinity 0.3) with each model's shape;
every solver gets the same per-MIP time limit. Prints a Markdown table, writes it as CSV and logs
every number to MLflow (experiment `benchmarks`, run `solver_scale`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from moetuner import PROJECT_ROOT
from moetuner.apps.solve import placement_metrics, solve_placement
from moetuner.atomic import atomic_path
from moetuner.placement.problem import PlacementProblem
from moetuner.synth import SynthSpec, synthesize
from moetuner.topology import topology_from_config
from moetuner.tracking import tracked_run


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


def h100_cluster(nodes: int, gpus_per_node: int) -> dict:
    """The H100 preset (conf/topology/h100_1x8.yaml) resized to nodes x gpus_per_node."""
    preset = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "topology" / "h100_1x8.yaml"))
    return {**preset, "name": f"h100_{nodes}x{gpus_per_node}", "nodes": nodes, "gpus_per_node": gpus_per_node}


def solvers() -> list[str]:
    """The solvers compared; steptail joins when its module is installed."""
    names = ["greedy", "eplb", "moetuner"]
    return names + ["steptail"] if importlib.util.find_spec("moetuner.placement.steptail") else names


def make_problem(case: Case, tokens: int, replicas: int) -> PlacementProblem:
    """A synthetic trace of the case's model shape on its H100 cluster."""
    trace = synthesize(SynthSpec(num_tokens=tokens, num_layers=case.layers, num_experts=case.experts,
                                 top_k=case.top_k, skew=1.0, affinity=0.3, seed=0, model=case.model))
    return PlacementProblem(trace, topology_from_config(h100_cluster(case.nodes, case.gpus_per_node)),
                            replicas=replicas)


def run_case(case: Case, problem: PlacementProblem, solver: str, time_limit: float) -> dict:
    """Solve one case with one solver; a table row."""
    placement = solve_placement(problem, solver, {"time_limit_s": time_limit, "mip_solver": "highs",
                                                  "gap_rel": 0.025})
    metrics = placement_metrics(placement, problem.load)
    return {"case": case.name, "E": case.experts, "L": case.layers, "G": problem.num_gpus, "solver": solver,
            "status": placement.status, "seconds": metrics["solve_seconds"], "objective": metrics["objective"],
            "bound": metrics["bound"], "gap": metrics["gap"], "imbalance": metrics["imbalance"]}


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (numbers to 3 significant digits, '-' for none)."""
    def cell(v: object) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-limit", type=float, default=2.0, help="seconds per MIP (default 2)")
    parser.add_argument("--tokens", type=int, default=4096, help="profile tokens per trace (default 4096)")
    parser.add_argument("--replicas", type=int, default=0, help="extra slots per GPU (default 0)")
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default all), e.g. mixtral-g4")
    parser.add_argument("--out", default="results/benchmarks/solver_scale.csv", help="CSV of the table")
    args = parser.parse_args()
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    config = {"time_limit_s": args.time_limit, "tokens": args.tokens, "replicas": args.replicas,
              "cases": [c.name for c in cases], "mlflow": {"experiment": "benchmarks"}}
    with tracked_run("solver_scale", config, tags={"benchmark": "solver_scale"}) as run:
        rows = []
        for case in tqdm(cases, desc="cases"):
            problem = make_problem(case, args.tokens, args.replicas)
            for solver in solvers():
                row = run_case(case, problem, solver, args.time_limit)
                rows.append(row)
                run.log_metrics({f"{case.name}.{solver}.{k}": row[k]
                                 for k in ("seconds", "objective", "bound", "gap", "imbalance")})
        print(markdown(rows))
        with atomic_path(args.out) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        run.log_artifact(Path(args.out))


if __name__ == "__main__":
    main()
