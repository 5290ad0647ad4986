"""Measured vs predicted MoE-layer time of placements on the emulated cpu_2x2 cluster.

    .venv/bin/python benchmarks/serve_emulated.py --out results/serve_emulated

Held-out ESFT intent routing (DeepSeek-V2-Lite, 26 MoE layers, 64 experts, top-6) is replayed with
moetuner-serve under contiguous, EPLB and steptail placements solved on the other sequences. The
runs are 2 namespaces x 2 gloo ranks with the inter-node veths rate limited to the topology's
inter-node bandwidth (root only; loopback otherwise, and the table says so). Constants are then
fitted on all runs (moetuner-calibrate's fit) and the simulator predicts each placement with the
calibrated topology. Prints a Markdown table, writes it as CSV and logs to MLflow (experiment
`benchmarks`, run `serve_emulated`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.apps.common import CONF_DIR
from moetuner.apps.serve import serve
from moetuner.atomic import write_atomic, write_text_atomic
from moetuner.importers import import_routing
from moetuner.placement.layout import save_placement
from moetuner.placement.problem import PlacementProblem, get_solver
from moetuner.serving.calibration import calibrated_topology, compare, fit_costs
from moetuner.simulator import cost_model, primary_column, simulate
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import Trace, save_trace, split_by_sequence
from moetuner.tracking import tracked_run

ESFT = PROJECT_ROOT.parent / "shared" / "data" / "esft-deepseek-v2-lite" / "intent"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "serve_emulated")
    p.add_argument("--topology", default="cpu_2x2")
    p.add_argument("--solvers", nargs="+", default=["contiguous", "eplb", "steptail"])
    p.add_argument("--replicas", type=int, default=2, help="extra slots per GPU for eplb/steptail")
    p.add_argument("--step-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="measured steps (after 1 warm-up step)")
    p.add_argument("--shape-scale", type=int, default=8)
    p.add_argument("--dataflow", default="dispatch_combine")
    p.add_argument("--steptail-seconds", type=float, default=20.0)
    return p.parse_args()


def solve(name: str, profile: Trace, topo_cfg: dict, replicas: int, args: argparse.Namespace):
    topology = topology_from_config(topo_cfg)
    problem = PlacementProblem(profile, topology, replicas=0 if name == "contiguous" else replicas,
                               step_tokens=args.step_tokens)
    options = {"time_limit_s": args.steptail_seconds, "dataflow": args.dataflow,
               "replica_policy": "round_robin"} if name == "steptail" else {}
    return get_solver(name)(problem, options)


def run_serve(trace_path: Path, placement: Path, out: Path, args: argparse.Namespace) -> dict:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("serve", overrides=[f"out={out}", f"trace={trace_path}", f"placement={placement}",
                                          f"topology={args.topology}", f"replay.step_tokens={args.step_tokens}",
                                          f"replay.max_steps={args.steps}", f"replay.shape_scale={args.shape_scale}",
                                          f"replay.dataflow={args.dataflow}", "launch.timeout_s=900",
                                          "mlflow.experiment=benchmarks"])
    return serve(cfg)


def predict(placements: dict, heldout: Trace, topo: dict, args: argparse.Namespace) -> dict[str, float]:
    """Simulator's moe-layer time per placement on the measured steps, with a topology config."""
    topology = topology_from_config(topo)
    hidden = heldout.hidden_size // args.shape_scale
    # the replay sends float32 rows of hidden + top_k gate weights; the simulator counts 2 bytes/value
    cost = cost_model(topology, 2 * (hidden + heldout.top_k), heldout.moe_intermediate_size // args.shape_scale)
    window = slice(args.step_tokens, (args.steps + 1) * args.step_tokens)  # after the warm-up step
    ids = heldout.topk_ids[window].astype(np.int64)
    primary = primary_column(heldout.topk_ids, heldout.topk_weights)[window]
    return {name: simulate(p.phy2log, p.num_gpus, ids, primary, heldout.num_experts, cost, args.step_tokens,
                           args.dataflow).metrics()["layer_time_s"] for name, p in placements.items()}


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trace = import_routing("esft", ESFT)
    profile, heldout = split_by_sequence(trace, 0.3, seed=0)
    held_path = save_trace(heldout, args.out / "heldout.safetensors")
    topo_cfg = topology_preset(args.topology)
    placements, metrics, tables = {}, {}, {}
    for name in args.solvers:
        placements[name] = solve(name, profile, topo_cfg, args.replicas, args)
        path = save_placement(placements[name], args.out / f"{name}.json")
        metrics[name] = run_serve(held_path, path, args.out / name, args)
        tables[name] = pd.read_csv(args.out / name / "per_layer.csv")
    fit = fit_costs(pd.concat(tables.values(), ignore_index=True))
    calibrated = calibrated_topology(topo_cfg, fit, f"{args.topology}_calibrated")
    write_text_atomic(args.out / "topology_calibrated.yaml", OmegaConf.to_yaml(OmegaConf.create(calibrated)))
    fit_report, spearman_fit = compare(tables, fit)
    sim_raw, sim_cal = predict(placements, heldout, topo_cfg, args), predict(placements, heldout, calibrated, args)
    base = args.solvers[0]
    rows = []
    for name in args.solvers:
        measured = metrics[name]["moe_layer_time_s"]
        rows.append({"placement": name, "measured_ms": 1e3 * measured,
                     "measured_speedup": metrics[base]["moe_layer_time_s"] / measured - 1,
                     "sim_calibrated_ms": 1e3 * sim_cal[name],
                     "sim_speedup": sim_cal[base] / sim_cal[name] - 1,
                     "sim_rel_error": abs(sim_cal[name] - measured) / measured,
                     "sim_roofline_ms": 1e3 * sim_raw[name],
                     "fit_rel_error": float(fit_report.set_index("run").loc[name, "rel_error"]),
                     "bytes_inter_MB_per_step": metrics[name]["bytes_inter_per_step"] / 1e6,
                     "emulated_network": metrics[name]["emulated_network"]})
    table = pd.DataFrame(rows)
    spearman = float(table["measured_ms"].corr(table["sim_calibrated_ms"], method="spearman"))
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print(f"Spearman(measured, simulator calibrated) = {spearman:.3f}; fit-model Spearman = {spearman_fit:.3f}")
    write_atomic(args.out / "serve_emulated.csv", lambda tmp: table.to_csv(tmp, index=False))
    cfg = {"mlflow": {"experiment": "benchmarks"}, "args": {k: str(v) for k, v in vars(args).items()}}
    with tracked_run("serve_emulated", cfg, tags={"dataset": "esft-intent", "topology": args.topology}) as run:
        for r in rows:
            run.log_metrics({f"{r['placement']}.{k}": v for k, v in r.items() if k != "placement"})
        run.log_metrics({"spearman": spearman})
        run.log_artifact(args.out / "serve_emulated.csv")


if __name__ == "__main__":
    main()
