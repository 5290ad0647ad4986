"""What changes when the cost model answers to measured kernels: roofline vs calibrated (CPU only).

    .venv/bin/python benchmarks/hardware_consequences.py --out docs/results/hardware --max-moves 1200

Placements (EPLB as SGLang runs it for the trace's model, steptail; steptail optimises the cost model of the
topology it is given) are solved on the profile half of ESFT `intent` (DeepSeek-V2-Lite routing, first half
of its sequences) and scored on the other half, at decode size (128 tokens per rank), at the study's 512-token
steps and at prefill size (4096 tokens per rank), on the h100, h200 and h800 presets under the roofline
(vendor peaks: the preset without its calibration block) and under the calibration each preset ships (fitted
on published tables, docs/hardware.md). Every placement is scored under both models ("scored_under"), so a
ranking flip shows whether optimising for the calibrated model matters. Writes DIR/regime.csv,
DIR/headline.csv, DIR/summary.csv (each model's placements scored under that model, side by side),
DIR/floor.csv (where an expert leaves the memory floor under each model, for the V2-Lite and V3 expert
shapes) and DIR/run.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from moetuner import PROJECT_ROOT
from moetuner.atomic import write_atomic
from moetuner.costmodel.cost import cost_model
from moetuner.report.regime import regime_table
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import solve_placement
from moetuner.topology import Topology, topology_from_config, topology_preset
from moetuner.trace import Trace, load_trace
from table import command_line, write_run_record  # benchmarks/table.py

# (preset, model): model "calibrated" = the preset as shipped, "roofline" = without its calibration block
PRESETS = ("h100_1x8", "h200_2x8", "h800_1x8", "h800_2x8")
MODELS = ("roofline", "calibrated")
VARIANTS = [(preset, model) for preset in PRESETS for model in MODELS]
SHAPES = {"deepseek_v2_lite": (2048, 1408), "deepseek_v3": (7168, 2048)}


def topology(preset: str, model: str) -> Topology:
    cfg = topology_preset(preset)
    return topology_from_config({**cfg, "calibration": {}} if model == "roofline" else cfg)


def halves(trace: Trace) -> tuple[Trace, Trace]:
    """(profile, held-out): the first half of the sequences in trace order, and the rest."""
    seqs = trace.sequences
    cut = len(seqs) // 2
    return trace.select_sequences(seqs[:cut], ":profile"), trace.select_sequences(seqs[cut:], ":heldout")


def floor_table() -> pd.DataFrame:
    """Per expert shape and model: 1-token expert time, and the tokens per expert where the time first
    doubles (where the expert leaves its memory floor)."""
    rows = []
    n = np.arange(1, 1 << 15)
    for shape, (h, i) in SHAPES.items():
        for preset, model in [("h200_2x8", "roofline"), ("h100_1x8", "calibrated"), ("h200_2x8", "calibrated"),
                              ("h800_1x8", "calibrated")]:
            cost = cost_model(topology(preset, model), h, i)
            t = cost.expert_time(n)
            rows.append({"shape": shape, "topology": preset, "model": model, "t1_us": t[0] * 1e6,
                         "t128_us": t[127] * 1e6, "t4096_us": t[4095] * 1e6,
                         "tokens_at_2x_floor": int(n[np.argmax(t >= 2 * t[0])])})
    return pd.DataFrame(rows)


def summary_table(wide: pd.DataFrame) -> pd.DataFrame:
    """Per topology, replicas and tokens per rank: EPLB's and steptail's speedup vs contiguous and their
    ratio, roofline / calibrated side by side, each model's placements scored under the model they were
    solved for."""
    own = wide[wide["solved_under"] == wide["scored_under"]]
    key = ["topology", "replicas", "tokens_per_rank"]
    sides = {m: own[own["solved_under"] == m].set_index(key)[["eplb", "steptail", "steptail_vs_eplb"]]
             for m in MODELS}
    out = sides["roofline"].join(sides["calibrated"], suffixes=("_roofline", "_calibrated")).reset_index()
    out["tokens_per_rank"] = out["tokens_per_rank"].astype(int)
    return out[[*key, *(f"{c}_{m}" for c in ("eplb", "steptail", "steptail_vs_eplb") for m in MODELS)]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "hardware")
    p.add_argument("--max-moves", type=int, default=1200, help="steptail's work budget per solve")
    p.add_argument("--trace", type=Path, default=PROJECT_ROOT / "data" / "esft" / "intent.safetensors")
    p.add_argument("--note", default="", help="a note on the run for run.json (machine, wall time)")
    args = p.parse_args()
    start = time.perf_counter()
    profile, held = halves(load_trace(args.trace))
    tables = []
    for preset, model in tqdm(VARIANTS, desc="variants"):
        topo = topology(preset, model)
        for replicas in ((0,) if topo.nodes == 1 else (0, 1)):
            problem = PlacementProblem.from_traces([profile], topo, replicas=replicas, step_tokens=512)
            placements = {(s, replicas): solve_placement(problem, s, {"max_moves": args.max_moves}
                                                         if s == "steptail" else {}).phy2log
                          for s in ("eplb", "steptail")}
            steps = [128 * topo.num_gpus, 512, 4096 * topo.num_gpus]
            for scored in MODELS:
                cost = cost_model(topology(preset, scored), held.hidden_size, held.moe_intermediate_size)
                t = regime_table(placements, preset, cost, held.topk_ids, held.topk_weights, held.num_experts, steps,
                                 "dispatch_combine")
                tables.append(t.assign(solved_under=model, scored_under=scored,
                                       tokens_per_rank=t["step_tokens"] / topo.num_gpus))
    regime = pd.concat(tables, ignore_index=True)
    key = ["topology", "solved_under", "scored_under", "replicas", "step_tokens", "tokens_per_rank"]
    wide = regime.pivot_table(index=key, columns="solver", values="speedup_vs_contiguous").reset_index()
    wide["steptail_vs_eplb"] = wide["steptail"] / wide["eplb"]
    floor = floor_table()
    summary = summary_table(wide)
    write_atomic(args.out / "regime.csv", lambda tmp: regime.to_csv(tmp, index=False))
    write_atomic(args.out / "headline.csv", lambda tmp: wide.to_csv(tmp, index=False))
    write_atomic(args.out / "floor.csv", lambda tmp: floor.to_csv(tmp, index=False))
    write_atomic(args.out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False, float_format="%.4f"))
    wall = time.perf_counter() - start
    write_run_record(args.out, command_line("hardware_consequences.py", sys.argv[1:]),
                     args.note or f"{wall:.0f} s wall, steptail {args.max_moves} moves")
    print(floor.to_markdown(index=False, floatfmt=".3g"))
    print(summary.to_markdown(index=False, floatfmt=".3f"))
    print(f"wall {wall:.0f} s (held-out tokens {held.num_tokens})")


if __name__ == "__main__":
    main()
