"""The fixed-placement lower bound (moetuner/costmodel/placement_bound.py) on the placement-quality rows, and
each solver's gap to it, next to the per-step bound.

    .venv/bin/python benchmarks/placement_bound.py

For every dynamic row of docs/results/placement_quality/placement_quality.csv (topology x replicas x dataflow):
the same held-out ESFT `intent` steps (first half of the sequences profiled, 512-token steps), the per-step bound
(`per_step_bound_us`, bounds.lower_bound: the placement may change from step to step) and the fixed-placement
bound (`fixed_bound_us`: one placement with the row's slots per GPU for all steps, any dispatch), the wall
seconds of the fixed bound (`bound_seconds`, 26 LPs with HiGHS), and the simulated time of eplb and steptail
under dynamic read from that CSV (contiguous_us / speedup) over each bound: `*_gap_to_bound` (fixed) and
`steptail_vs_per_step_bound`. Writes docs/results/placement_bound/placement_bound.csv and run.json.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from moetuner import PROJECT_ROOT
from moetuner.costmodel.cost import cost_model
from moetuner.costmodel.placement_bound import fixed_placement_bound
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import load_trace
from placement_quality import DATA, first_part  # benchmarks/placement_quality.py
from table import command_line, markdown, write_csv, write_run_record  # benchmarks/table.py

QUALITY = PROJECT_ROOT / "docs" / "results" / "placement_quality" / "placement_quality.csv"
COLUMNS = ["topology", "replicas", "dataflow", "per_step_bound_us", "fixed_bound_us", "bound_seconds",
           "eplb_gap_to_bound", "steptail_gap_to_bound", "steptail_vs_per_step_bound"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-tokens", type=int, default=512, help="tokens per step (default 512, as the CSV)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "results" / "placement_bound"
                                             / "placement_bound.csv"), help="CSV of the table")
    parser.add_argument("--note", default="", help="what to say about the machine (e.g. 2 shared cores)")
    args = parser.parse_args()
    started = time.time()
    held = first_part(load_trace(DATA / "intent.safetensors"))[1]
    with open(QUALITY, newline="") as f:
        quality = [r for r in csv.DictReader(f) if r["dispatch"] == "dynamic"]
    rows = []
    for row in quality:
        topology = topology_from_config(topology_preset(row["topology"]))
        cost = cost_model(topology, held.hidden_size, held.moe_intermediate_size)
        slots = topology.slots_per_gpu(held.num_experts, int(row["replicas"]))
        bound = fixed_placement_bound(held.topk_ids, cost, slots, args.step_tokens, row["dataflow"])
        time_us = {s: float(row["contiguous_us"]) / float(row[s]) for s in ("eplb", "steptail")}
        fixed_us = bound.step_s * 1e6
        rows.append({"topology": row["topology"], "replicas": int(row["replicas"]), "dataflow": row["dataflow"],
                     "per_step_bound_us": bound.per_step_s * 1e6, "fixed_bound_us": fixed_us,
                     "bound_seconds": bound.seconds, "eplb_gap_to_bound": time_us["eplb"] / fixed_us,
                     "steptail_gap_to_bound": time_us["steptail"] / fixed_us,
                     "steptail_vs_per_step_bound": time_us["steptail"] / (bound.per_step_s * 1e6)})
        print(markdown(rows[-1:], COLUMNS, ".3f"), flush=True)
    print(markdown(rows, COLUMNS, ".3f"))
    out = Path(args.out)
    write_csv(out, rows, COLUMNS)
    write_run_record(out.parent, command_line("placement_bound.py", sys.argv[1:]),
                     f"{time.time() - started:.0f} s wall, {len(rows)} rows" + (f"; {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
