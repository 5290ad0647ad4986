"""The work that the former wall-clock limits bought, on the default study's solves: how the work budgets
of `steptail` (`max_moves`) and the MoETuner MIPs (`max_nodes`) were calibrated.

    nice .venv/bin/python benchmarks/solver_budgets.py --note "2 shared cores, other jobs running"

Solves: ESFT `intent`, split as conf/study/default.yaml splits it (half of the sequences held out,
seed 0), profile half, 512-token steps, dispatch dynamic, on (h100_1x8, 0 replicas), (h200_2x8, 0) and
(h200_2x8, 1): the study's intent grids. Each solver runs with the study's former limit as its cap and
an unbounded work budget, so the cap binds and the work done in that time is counted:
- steptail: the former `time_limit_s=5` covered the warm starts, their scoring and the search. Counted
  in CPU seconds of this process, which load does not inflate (it takes CPU time away; a move costs the
  same CPU time): a run with `max_moves=0` gives the overhead (`overhead_s`), a run with `moves` moves
  the cost of one (`moves_per_cpu_s`), and `moves_quiet` = (5 s - overhead) x moves per CPU second is
  what the 5 s bought on a quiet one-core-per-job machine.
- moetuner: the former `time_limit_s=0.5, gap_rel=0.1` per MIP with no node budget; `mips` solved,
  `time_bound` how many the limit stopped, `max_nodes_reached` the most branch-and-bound nodes one of
  those explored (0: stopped in the root node, the incumbent being the warm start), `nodes_quiet` that
  count scaled by wall / CPU seconds.
Prints a Markdown table and writes docs/results/solver_budgets/calibration.csv (with run.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moetuner import PROJECT_ROOT
from moetuner.solvers import mip as mip_module
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import load_trace, split_by_sequence
from table import command_line, markdown, write_csv, write_run_record  # benchmarks/table.py

CASES = (("h100_1x8", 0), ("h200_2x8", 0), ("h200_2x8", 1))
UNBOUNDED = 10**9
COLUMNS = ["topology", "replicas", "solver", "limit_s", "overhead_s", "search_s", "cpu_share", "moves",
           "moves_per_cpu_s", "moves_quiet", "mips", "time_bound", "max_nodes_reached", "nodes_quiet"]


def timed(problem: PlacementProblem, solver: str, options: dict) -> tuple[dict, float, float]:
    """(placement extra, wall seconds, CPU seconds of this process) of one solve."""
    wall, cpu = time.perf_counter(), time.process_time()
    placement = solve_placement(problem, solver, options)
    return placement.extra, time.perf_counter() - wall, time.process_time() - cpu


def steptail_row(problem: PlacementProblem, limit_s: float, probe_moves: int) -> dict:
    """The moves steptail scores in what its former whole-solve limit leaves for the search, counted in
    CPU time (load-independent): (limit - the CPU seconds of the warm starts and scorings) / the CPU
    seconds of one move, measured as the difference of a `probe_moves` run and a 0-move run."""
    _, wall0, cpu0 = timed(problem, "steptail", {"max_moves": 0})
    extra, wall, cpu = timed(problem, "steptail", {"max_moves": probe_moves})
    assert extra["budget_bound_by"] == "moves"
    per_move = max(cpu - cpu0, 1e-9) / probe_moves
    return {"solver": "steptail", "limit_s": limit_s, "overhead_s": cpu0, "search_s": limit_s - cpu0,
            "cpu_share": cpu / wall, "moves": probe_moves, "moves_per_cpu_s": 1.0 / per_move,
            "moves_quiet": max(int((limit_s - cpu0) / per_move), 0)}


def moetuner_row(problem: PlacementProblem, limit_s: float, gap_rel: float) -> dict:
    """Node counts of the MIPs the former per-MIP limit stopped."""
    results: list[mip_module.MipResult] = []
    original = mip_module.solve_mip

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003 - solve_mip's own signature
        results.append(original(*args, **kwargs))
        return results[-1]

    import moetuner.solvers.moetuner_ilp as ilp

    ilp.solve_mip = recording
    try:
        _, wall, cpu = timed(problem, "moetuner", {"time_limit_s": limit_s, "gap_rel": gap_rel,
                                                   "max_nodes": UNBOUNDED})
    finally:
        ilp.solve_mip = original
    stopped = [r.nodes for r in results if r.bound_by == "time" and r.nodes is not None]
    reached = max(stopped, default=None)
    return {"solver": "moetuner", "limit_s": limit_s, "search_s": wall, "cpu_share": cpu / wall,
            "mips": len(results), "time_bound": len(stopped), "max_nodes_reached": reached,
            "nodes_quiet": None if reached is None else int(reached * wall / cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steptail-limit", type=float, default=5.0, help="former steptail time_limit_s (5)")
    parser.add_argument("--mip-limit", type=float, default=0.5, help="former time_limit_s per MIP (0.5)")
    parser.add_argument("--gap-rel", type=float, default=0.1, help="the study's gap_rel (0.1)")
    parser.add_argument("--probe-moves", type=int, default=1000, help="moves of the per-move cost run (1000)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "results" / "solver_budgets" / "calibration.csv"))
    parser.add_argument("--note", default="", help="what to say about the machine (e.g. 2 shared cores)")
    args = parser.parse_args()
    started = time.time()
    profile, _ = split_by_sequence(load_trace(PROJECT_ROOT / "data" / "esft" / "intent.safetensors"), 0.5, 0)
    rows = []
    for topology, replicas in CASES:
        problem = PlacementProblem(profile, topology_from_config(topology_preset(topology)), replicas=replicas, step_tokens=512)
        for row in (steptail_row(problem, args.steptail_limit, args.probe_moves), moetuner_row(problem, args.mip_limit, args.gap_rel)):
            rows.append({c: None for c in COLUMNS} | row | {"topology": topology, "replicas": replicas})
            print(markdown(rows[-1:], COLUMNS), flush=True)
    print(markdown(rows, COLUMNS))
    out = Path(args.out)
    write_csv(out, rows, COLUMNS)
    write_run_record(out.parent, command_line("solver_budgets.py", sys.argv[1:]),
                     f"{args.note}; {time.time() - started:.0f} s".strip("; "))


if __name__ == "__main__":
    main()
