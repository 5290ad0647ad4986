"""Does resampling steps give the interval that resampling sequences gives? (docs/simulator.md, "Intervals")

    .venv/bin/python benchmarks/bootstrap_check.py --resamples 200

ESFT intent, split as the default study splits it (half of the sequences held out, seed 0), h200_2x8,
no replicas, dispatch-combine, `dynamic`, 512-token steps. Placements solved on the profile half:
eplb and the co-activation partition (steptail's usual warm start). For each, the speedup vs
contiguous on the held-out half and two 95% intervals:
- steps: the paired bootstrap over the scored steps that moetuner-simulate reports (intervals.py);
- sequences: resample the held-out sequences with replacement, concatenate their tokens in draw
  order, cut the result into steps again and re-simulate placement and contiguous on it (what the
  step bootstrap avoids: one simulation per resample).
Writes docs/results/bootstrap_check/bootstrap_check.csv and run.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from tqdm import tqdm

from moetuner import PROJECT_ROOT
from moetuner.costmodel.cost import cost_model
from moetuner.costmodel.intervals import speedup_interval
from moetuner.costmodel.score import score
from moetuner.placement import contiguous_phy2log, expert_location
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import load_trace, split_by_sequence
from table import command_line, markdown, write_csv, write_run_record  # benchmarks/table.py

OUT = PROJECT_ROOT / "docs" / "results" / "bootstrap_check"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--step-tokens", type=int, default=512)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    started = time.time()
    profile, held = split_by_sequence(load_trace(PROJECT_ROOT / "data" / "esft" / "intent.safetensors"), 0.5, seed=0)
    topology = topology_from_config(topology_preset("h200_2x8"))
    cost = cost_model(topology, held.hidden_size, held.moe_intermediate_size)
    problem = PlacementProblem(profile, topology, step_tokens=args.step_tokens)
    placements = {"contiguous": contiguous_phy2log(held.num_layers, held.num_experts, topology.num_gpus,
                                                   problem.slots_per_gpu)}
    placements.update({s: solve_placement(problem, s, {}).phy2log for s in ("eplb", "partition")})
    weights = held.topk_weights
    steps = lambda phy, rows: score(expert_location(phy, topology.num_gpus, held.num_experts),  # noqa: E731
                                    held.topk_ids[rows], None if weights is None else weights[rows], cost,
                                    args.step_tokens).step_s
    whole = np.arange(held.num_tokens)
    per_step = {name: steps(phy, whole) for name, phy in placements.items()}
    tokens_of = [np.flatnonzero(held.seq_ids == s) for s in held.sequences]
    rng = np.random.default_rng(0)
    resampled = {name: [] for name in placements if name != "contiguous"}
    for _ in tqdm(range(args.resamples), desc="sequence resamples"):
        rows = np.concatenate([tokens_of[i] for i in rng.integers(0, len(tokens_of), len(tokens_of))])
        base = steps(placements["contiguous"], rows).mean()
        for name in resampled:
            resampled[name].append(base / steps(placements[name], rows).mean())
    table = []
    for name, speedups in resampled.items():
        low, high = speedup_interval(per_step["contiguous"], per_step[name])
        seq_low, seq_high = np.quantile(speedups, [0.025, 0.975])
        table.append({"placement": name, "held_out_steps": len(per_step[name]),
                      "sequences": len(tokens_of), "speedup": per_step["contiguous"].mean() / per_step[name].mean(),
                      "steps_ci_low": low, "steps_ci_high": high, "sequences_ci_low": float(seq_low),
                      "sequences_ci_high": float(seq_high)})
    columns = list(table[0])
    print(markdown(table, columns, ".3f"))
    write_csv(OUT / "bootstrap_check.csv", table, columns)
    write_run_record(OUT, command_line("bootstrap_check.py", sys.argv[1:]),
                     f"{time.time() - started:.0f} s wall, {args.resamples} sequence resamples"
                     + (f"; {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
