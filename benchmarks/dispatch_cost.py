"""Replica choice per batch: its cost (ms per layer-step) and the step time it gives, for every dispatch.

    .venv/bin/python benchmarks/dispatch_cost.py                       # synthetic, 2048-token steps
    .venv/bin/python benchmarks/dispatch_cost.py --esft intent --solvers eplb greedy

Workload: a synthetic DeepSeek-V2-Lite-like trace (64 experts, top-6, Zipf skew 1.0, co-activation 0.3,
moetuner.synth; the first half profiles, the second half is scored), or with `--esft DOMAIN` the real
ESFT routing shipped in data/esft/DOMAIN.safetensors split by sequence (half held out, seed 0).
Placements: each of `--solvers` with `--replicas` extra slots per GPU, solved on the profile tokens.
For each dispatch (moetuner.costmodel.replicas.DISPATCHES): `ms_*` times `choose_slots` alone (what an engine would run
per batch) on the first `--layers` layers of the first scored step; the other columns simulate every
scored step (`--dataflow`): speedup vs contiguous, and the summed compute tail and all-to-all per step.
Prints a Markdown table and writes it as CSV.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from moetuner import PROJECT_ROOT
from moetuner.solvers.registry import solve_placement
from moetuner.placement import contiguous_phy2log, expert_location
from moetuner.solvers.problem import PlacementProblem
from moetuner.costmodel.cost import cost_model
from moetuner.costmodel.replicas import choose_slots
from moetuner.costmodel.settings import DISPATCHES
from moetuner.costmodel.score import score
from moetuner.synth import SynthSpec, synthesize
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import Trace, load_trace, split_by_sequence
from table import markdown, write_csv  # benchmarks/table.py

COLUMNS = ["solver", "dispatch", "ms_median", "ms_max", "speedup_vs_contiguous", "step_us", "compute_us", "a2a_us"]


def workload(args: argparse.Namespace) -> tuple[Trace, Trace]:
    """(profile, scored) traces."""
    if args.esft:
        return split_by_sequence(load_trace(PROJECT_ROOT / "data" / "esft" / f"{args.esft}.safetensors"), 0.5, seed=0)
    trace = synthesize(SynthSpec(num_tokens=4 * args.tokens, num_layers=args.layers, skew=1.0,
                                 coactivation=0.3, seed=1).check())
    first = np.arange(trace.num_tokens) < trace.num_tokens // 2
    return trace.select_tokens(first, ".profile"), trace.select_tokens(~first, ".scored")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (default 2048)")
    parser.add_argument("--layers", type=int, default=8, help="layer-steps timed per dispatch (default 8)")
    parser.add_argument("--topology", default="h200_2x8")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--solvers", nargs="*", default=["eplb"])
    parser.add_argument("--dataflow", default="dispatch_combine")
    parser.add_argument("--esft", default=None, help="an ESFT domain (intent, law) instead of the synthetic trace")
    parser.add_argument("--out", default="results/benchmarks/dispatch_cost.csv", help="CSV of the table")
    args = parser.parse_args()
    profile, scored = workload(args)
    topology = topology_from_config(topology_preset(args.topology))
    cost = cost_model(topology, scored.hidden_size, scored.moe_intermediate_size)
    ids = scored.topk_ids.astype(np.int64)
    simulated = lambda phy, d: score(expert_location(phy, topology.num_gpus, scored.num_experts),  # noqa: E731
                                     scored.topk_ids, scored.topk_weights, cost, args.tokens, args.dataflow,
                                     d).result.metrics()  # free: the decision's cost is the ms columns
    base = simulated(contiguous_phy2log(scored.num_layers, scored.num_experts, topology.num_gpus,
                                        math.ceil(scored.num_experts / topology.num_gpus)), "dynamic")
    token = np.arange(args.tokens)
    src = token % topology.num_gpus
    rows = []
    for solver in args.solvers:
        problem = PlacementProblem(profile, topology, replicas=args.replicas, step_tokens=args.tokens)
        placement = solve_placement(problem, solver, {})
        slots = expert_location(placement.phy2log, topology.num_gpus, scored.num_experts).layers()
        for dispatch in DISPATCHES:
            seconds = []
            for layer in range(min(args.layers, scored.num_layers)):
                start = time.perf_counter()
                choose_slots(ids[:args.tokens, layer], token, src, slots[layer], dispatch, cost)
                seconds.append(time.perf_counter() - start)
            m = simulated(placement.phy2log, dispatch)
            rows.append({"solver": solver, "dispatch": dispatch, "ms_median": 1e3 * float(np.median(seconds)),
                         "ms_max": 1e3 * float(np.max(seconds)),
                         "speedup_vs_contiguous": base["layer_time_s"] / m["layer_time_s"],
                         "step_us": 1e6 * m["layer_time_s"], "compute_us": 1e6 * m["compute_time_s"],
                         "a2a_us": 1e6 * m["a2a_time_s"]})
    print(f"{scored.source}: {args.tokens}-token steps ({base['num_steps']} scored), {scored.num_experts} experts "
          f"(top-{scored.top_k}), {args.topology} ({topology.num_gpus} GPUs), r{args.replicas}, {args.dataflow}")
    print(markdown(rows, COLUMNS))
    print(f"wrote {write_csv(Path(args.out), rows, COLUMNS)}")


if __name__ == "__main__":
    main()
