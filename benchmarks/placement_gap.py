"""Reduced instances solved exactly: is the gap to the fixed-placement bound the bound's or the solver's?

    .venv/bin/python benchmarks/placement_gap.py

Each instance is cut from the held-out ESFT `intent` steps of benchmarks/placement_bound.py (second half of
the sequences): a few layers evenly spaced, each token's `top_k` highest-weighted experts, expert ids pooled
modulo `experts` (so every slot holds one expert: experts = GPUs x slots, no replicas), the first `steps` steps
of `tokens_per_gpu` x GPUs tokens, on the fitted preset's links and GEMM model with fewer GPUs (`nodes` x
`gpus_per_node`), dispatch_combine. On that same routing (in-sample: the steps scored are the steps solved)
it reports, as mean step time in microseconds: the per-step bound (`per_step_bound_us`, bounds.lower_bound),
the fixed-placement bound (`fixed_bound_us`, costmodel/placement_bound.py), the exact optimum
(`exact_us`: solvers/step_mip.py, one MIP per layer, warm-started from steptail's placement, `max_nodes`
branch-and-bound nodes per layer; `proven` layers proven optimal, `mip_bound_us` HiGHS's bound, equal to
`exact_us` when every layer is proven), steptail (the placement-quality run's budget per layer: 1200 moves
over 26 layers, 46 a layer), the co-activation partition (steptail's usual warm start) and EPLB (as
registered). Ratios: `exact_vs_fixed_bound` (how loose the bound is), `steptail_vs_exact` and
`eplb_vs_exact` (how far the solvers are from the optimum). Every time is the simulator's (the MIP's value
is asserted equal to the simulated time of its placement). Writes docs/results/placement_gap/reduced.csv.

The budget table (budget.csv): does more search help at full size? On 4 layers evenly spaced of the real
instance (64 experts, top-6, 512-token steps, `h100_1x8` and `h200_2x8` without replicas, dispatch_combine),
steptail solved on the profile half of `intent` at the placement-quality budget (46 moves a layer) and at
10x it (two seeds), with the co-activation partition for reference: mean step time (4 layers) on the
profile steps it searched (`profile_us`) and on the held-out steps (`heldout_us`), and the held-out time
over the 46-move placement's (`heldout_vs_base`). Writes run.json beside both.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moetuner import PROJECT_ROOT
from moetuner.costmodel.bounds import lower_bound
from moetuner.costmodel.cost import cost_model
from moetuner.costmodel.placement_bound import fixed_placement_bound
from moetuner.placement import expert_location
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import get_solver
from moetuner.solvers.step_mip import solve_layer
from moetuner.solvers.steptail import profile_steps, step_objective
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import Trace, load_trace
from placement_quality import DATA, first_part  # benchmarks/placement_quality.py
from table import command_line, markdown, write_csv, write_run_record  # benchmarks/table.py

MOVES_PER_LAYER = 46  # placement_quality.py --max-moves 1200 over 26 layers


@dataclass(frozen=True)
class Instance:
    """A reduced instance: `experts` pooled experts, top-`top_k`, `layers` layers, `steps` steps of
    `tokens_per_gpu` tokens per GPU, on `preset`'s links and GEMM model with nodes x gpus_per_node GPUs."""

    name: str
    preset: str
    nodes: int
    gpus_per_node: int
    experts: int
    top_k: int
    layers: int
    steps: int
    tokens_per_gpu: int = 32  # as the placement-quality rows on 16 GPUs (512-token steps)
    max_nodes: int = 2000


INSTANCES = (
    Instance("two_node_8", "h200_2x8", 2, 2, 8, 2, 2, 4),
    Instance("two_node_16", "h200_2x8", 2, 2, 16, 3, 2, 2),
    Instance("one_node_8", "h100_1x8", 1, 4, 8, 2, 2, 4),
    Instance("one_node_16", "h100_1x8", 1, 4, 16, 3, 2, 2),
)
COLUMNS = ["instance", "preset", "gpus", "experts", "top_k", "layers", "steps", "step_tokens", "per_step_bound_us",
           "fixed_bound_us", "exact_us", "mip_bound_us", "proven", "steptail_us", "partition_us", "eplb_us",
           "exact_vs_fixed_bound", "steptail_vs_exact", "eplb_vs_exact", "mip_seconds"]


def reduced_trace(held: Trace, inst: Instance) -> Trace:
    """The instance's routing cut from `held` (module docstring); no gate weights (top-k already chosen)."""
    assert held.topk_weights is not None, "the reduction keeps each token's highest-weighted experts"
    step_tokens = inst.nodes * inst.gpus_per_node * inst.tokens_per_gpu
    tokens = inst.steps * step_tokens
    assert tokens <= held.num_tokens, f"{inst.name}: {tokens} tokens asked, {held.num_tokens} held out"
    pick = np.linspace(0, held.num_layers - 1, inst.layers).round().astype(int)
    order = np.argsort(-held.topk_weights[:tokens, pick], axis=2, kind="stable")[..., :inst.top_k]
    ids = np.take_along_axis(held.topk_ids[:tokens, pick].astype(np.int64), order, 2) % inst.experts
    return replace(held, topk_ids=ids.astype(np.int16), seq_ids=held.seq_ids[:tokens], num_experts=inst.experts,
                   moe_layers=[held.moe_layers[i] for i in pick], topk_weights=None,
                   source=f"{held.source}:{inst.name}")


def gpu_of_experts(row: np.ndarray, slots_per_gpu: int, num_experts: int) -> np.ndarray:
    """GPU of each expert in a row of slots [P] holding every expert once. -> [E]"""
    gpu = np.full(num_experts, -1)
    gpu[row[row >= 0]] = np.flatnonzero(row >= 0) // slots_per_gpu
    return gpu


def run(held: Trace, inst: Instance) -> dict:
    """One row of the table (module docstring)."""
    trace = reduced_trace(held, inst)
    cfg = {**topology_preset(inst.preset), "nodes": inst.nodes, "gpus_per_node": inst.gpus_per_node,
           "name": f"{inst.preset}:{inst.nodes}x{inst.gpus_per_node}"}
    topology = topology_from_config(cfg)
    num_gpus, step_tokens = topology.num_gpus, topology.num_gpus * inst.tokens_per_gpu
    slots = inst.experts // num_gpus
    assert slots * num_gpus == inst.experts, f"{inst.name}: experts must fill every slot once"
    cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
    problem = PlacementProblem(trace, topology, step_tokens=step_tokens)
    steps = profile_steps(problem)
    time_us = lambda phy: float(step_objective(phy, problem, cost, steps).sum()) * 1e6  # noqa: E731
    solved = {name: get_solver(name)(problem, opts).phy2log for name, opts in
              (("steptail", {"max_moves": MOVES_PER_LAYER * inst.layers}), ("partition", {}), ("eplb", {}))}
    exact, mip_bound, mip_value, proven, start = [], 0.0, 0.0, 0, time.perf_counter()
    for layer in range(inst.layers):
        windows = trace.topk_ids[:, layer].astype(np.int64).reshape(inst.steps, step_tokens, inst.top_k)
        warm = gpu_of_experts(solved["steptail"][layer], slots, inst.experts)
        mip = solve_layer(windows, cost, inst.experts, slots, start=warm, max_nodes=inst.max_nodes)
        exact.append(mip.row)
        mip_value += mip.time_s
        proven += mip.result.status == "optimal"
        mip_bound += mip.bound_s if mip.bound_s is not None else 0.0
    mip_seconds = time.perf_counter() - start
    exact_us = time_us(np.stack(exact))
    assert abs(mip_value * 1e6 - exact_us) <= 1e-6 * exact_us, "the MIP's value is not the simulated time"
    fixed = fixed_placement_bound(trace.topk_ids, cost, slots, step_tokens).step_s * 1e6
    row = {"instance": inst.name, "preset": inst.preset, "gpus": f"{inst.nodes}x{inst.gpus_per_node}",
           "experts": inst.experts, "top_k": inst.top_k, "layers": inst.layers, "steps": inst.steps,
           "step_tokens": step_tokens,
           "per_step_bound_us": lower_bound(trace.topk_ids, cost, slots, step_tokens) * 1e6,
           "fixed_bound_us": fixed, "exact_us": exact_us, "mip_bound_us": mip_bound * 1e6,
           "proven": f"{proven}/{inst.layers}", "mip_seconds": mip_seconds,
           **{f"{name}_us": time_us(phy) for name, phy in solved.items()}}
    row.update(exact_vs_fixed_bound=exact_us / fixed, steptail_vs_exact=row["steptail_us"] / exact_us,
               eplb_vs_exact=row["eplb_us"] / exact_us)
    assert fixed <= exact_us * (1 + 1e-9) and mip_bound * 1e6 <= exact_us * (1 + 1e-6), "a bound above a placement"
    return row


BUDGET_COLUMNS = ["topology", "layers", "solver", "moves_per_layer", "seed", "profile_us", "heldout_us",
                  "heldout_vs_base"]
BUDGET_LAYERS = (0, 8, 17, 25)


def layer_slice(trace: Trace, layers: tuple[int, ...]) -> Trace:
    """`trace` restricted to `layers`."""
    return replace(trace, topk_ids=trace.topk_ids[:, list(layers)], moe_layers=[trace.moe_layers[i] for i in layers],
                   topk_weights=None if trace.topk_weights is None else trace.topk_weights[:, list(layers)])


def budget_rows(profile: Trace, held: Trace, topology_name: str) -> list[dict]:
    """The budget table's rows of one topology (module docstring)."""
    profile, held = layer_slice(profile, BUDGET_LAYERS), layer_slice(held, BUDGET_LAYERS)
    topology = topology_from_config(topology_preset(topology_name))
    cost = cost_model(topology, held.hidden_size, held.moe_intermediate_size)
    on = {name: PlacementProblem(t, topology, step_tokens=512) for name, t in (("profile", profile), ("held", held))}
    time_us = lambda phy, p: float(step_objective(phy, on[p], cost, profile_steps(on[p])).sum()) * 1e6  # noqa: E731
    runs = [("partition", 0, 0), ("steptail", MOVES_PER_LAYER, 0), ("steptail", 10 * MOVES_PER_LAYER, 0),
            ("steptail", 10 * MOVES_PER_LAYER, 1)]
    rows = []
    for solver, moves, seed in runs:
        opts = {"max_moves": moves * len(BUDGET_LAYERS), "seed": seed} if solver == "steptail" else {}
        phy = get_solver(solver)(on["profile"], opts).phy2log
        rows.append({"topology": topology_name, "layers": len(BUDGET_LAYERS), "solver": solver,
                     "moves_per_layer": moves if solver == "steptail" else None, "seed": seed,
                     "profile_us": time_us(phy, "profile"), "heldout_us": time_us(phy, "held")})
    base = rows[1]["heldout_us"]
    for row in rows:
        row["heldout_vs_base"] = row["heldout_us"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "results" / "placement_gap" / "reduced.csv"),
                        help="CSV of the reduced instances (budget.csv and run.json go beside it)")
    parser.add_argument("--note", default="", help="what to say about the machine (e.g. 2 shared cores)")
    args = parser.parse_args()
    started = time.time()
    profile, held = first_part(load_trace(DATA / "intent.safetensors"))
    rows = []
    for inst in INSTANCES:
        rows.append(run(held, inst))
        print(markdown(rows[-1:], COLUMNS, ".4g"), flush=True)
    print(markdown(rows, COLUMNS, ".4g"))
    out = Path(args.out)
    write_csv(out, rows, COLUMNS)
    budget = [row for name in ("h100_1x8", "h200_2x8") for row in budget_rows(profile, held, name)]
    print(markdown(budget, BUDGET_COLUMNS, ".4g"))
    write_csv(out.parent / "budget.csv", budget, BUDGET_COLUMNS)
    write_run_record(out.parent, command_line("placement_gap.py", sys.argv[1:]),
                     f"{time.time() - started:.0f} s wall, {len(rows)} reduced instances, {len(budget)} budget rows"
                     + (f"; {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
