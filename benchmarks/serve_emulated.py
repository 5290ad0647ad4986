"""Measured vs predicted MoE-layer time of placements on the emulated h200_2x8 cluster (16 ranks).

    .venv/bin/python benchmarks/serve_emulated.py --out results/serve_emulated

Held-out ESFT intent routing (DeepSeek-V2-Lite, 26 MoE layers, 64 experts, top-6; 30% of the
sequences held out, placements solved on the rest) is replayed with moetuner-serve on the target
topology emulated at full rank count (one process and one shaped network namespace per rank,
time-dilated by D, compute timed: docs/serving.md). Every placement is served `--repeats` times.
Per placement: the target's measured time (measured / D, mean over repeats), the simulator's
prediction on exactly the served steps, their relative error, the share of the prediction the
emulation waits out from the cost model (injected_share) and the error on the transfers alone, the run-to-run coefficient of
variation, and speedups vs contiguous. Then Spearman(measured, predicted), the calibration
self-check (moetuner-calibrate on a sweep of contiguous runs at D = 20000 whose traffic stays in a
node or only crosses nodes, at two step sizes each, vs the topology's own constants), and the
aims. Prints Markdown,
writes serve_emulated.csv and summary.json, logs to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir

from moetuner import CONF_DIR, PROJECT_ROOT
from moetuner.atomic import write_atomic, write_json_atomic
from moetuner.importers import import_routing
from moetuner.placement import save_placement
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import get_solver
from moetuner.serving.calibration import fit_costs, read_runs, stack_runs
from moetuner.serving.netns import netns_unavailable_reason
from moetuner.serving.run import serve
from moetuner.serving.emulation import target_cost
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import Trace, load_trace, save_trace, split_by_sequence
from moetuner.tracking import tracked_run

SHIPPED = PROJECT_ROOT / "data" / "esft" / "intent.safetensors"
SHARED = PROJECT_ROOT.parent / "shared" / "data" / "esft-deepseek-v2-lite" / "intent"
PLACEMENTS = ["contiguous:0", "round_robin:0", "eplb:0", "eplb:1", "steptail:0", "steptail:1", "moetuner:0"]
PAPER_SPEEDUP = 0.175  # MoETuner (Go & Mahajan 2025), two nodes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "serve_emulated")
    p.add_argument("--topology", default="h200_2x8")
    p.add_argument("--placements", nargs="+", default=PLACEMENTS, help="solver:replicas")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dilation", default="5000", help="D, or auto")
    p.add_argument("--compute", default="timed")
    p.add_argument("--step-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--shape-scale", type=int, default=64)
    p.add_argument("--dataflow", default="dispatch_combine")
    p.add_argument("--holdout", type=float, default=0.3)
    p.add_argument("--steptail-moves", type=int, default=1200, help="steptail's work budget (the default study's)")
    p.add_argument("--hot-receiver-check", action="store_true", help="only the synthetic hot-port check")
    return p.parse_args()


def routing():
    """ESFT intent: the shipped trace, else imported from ../shared/data."""
    return load_trace(SHIPPED) if SHIPPED.is_file() else import_routing("esft", SHARED)


def solve(name: str, replicas: int, profile, topo_cfg: dict, args: argparse.Namespace):
    problem = PlacementProblem(profile, topology_from_config(topo_cfg), replicas=replicas, step_tokens=args.step_tokens,
                               dataflow=args.dataflow)
    options = {"steptail": {"max_moves": args.steptail_moves, "dataflow": args.dataflow},
               "moetuner": {"max_nodes": 0, "gap_rel": 0.1}}.get(name, {})
    return get_solver(name)(problem, options)


def run_serve(trace_path: Path, placement: Path, out: Path, args: argparse.Namespace) -> dict:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("serve", overrides=[
            f"out={out}", f"trace={trace_path}", f"placement={placement}", f"topology={args.topology}",
            f"replay.step_tokens={args.step_tokens}", f"replay.max_steps={args.steps}",
            f"replay.warmup_steps={args.warmup}", f"replay.shape_scale={args.shape_scale}",
            f"replay.dataflow={args.dataflow}", "emulation.enabled=true", f"emulation.dilation={args.dilation}",
            f"emulation.compute={args.compute}", "launch.timeout_s=600", "mlflow.enabled=false"])
    return serve(cfg)


def confined_routing(trace: Trace, nodes: int, gpus_per_node: int, across: bool, seed: int = 0) -> Trace:
    """The trace's tokens re-routed so that, under the contiguous placement, all their traffic stays in
    the home node (across=False: only intra-node links) or all of it crosses to the next node (True):
    k distinct experts per layer from that node's, Zipf-skewed (calibration runs, one link kind each)."""
    rng = np.random.default_rng(seed)
    per_node = trace.num_experts // nodes
    tokens, layers, k = trace.topk_ids.shape
    node = (np.arange(tokens) % (nodes * gpus_per_node) // gpus_per_node + int(across)) % nodes
    skew = 1 / np.arange(1, per_node + 1)
    local = np.array([rng.choice(per_node, k, replace=False, p=skew / skew.sum())
                      for _ in range(tokens * layers)]).reshape(tokens, layers, k)
    ids = local + per_node * node[:, None, None]
    return dataclasses.replace(trace, topk_ids=ids.astype(np.int16), source=f"{trace.source}+confined")


CALIBRATION_RUNS = [("intra", 512, 1), ("intra", 2048, 1), ("inter", 128, 1), ("inter", 512, 1)]
"""The self-check's runs: (link kind, step tokens, measured steps), contiguous placement, D = 20000."""


def calibration_runs(heldout: Trace, topo_cfg: dict, args: argparse.Namespace) -> list[Path]:
    """Serve the calibration sweep; the run folders."""
    placement = save_placement(solve("contiguous", 0, heldout, topo_cfg, args), args.out / "calibration.json")
    dirs = []
    for kind, step_tokens, steps in CALIBRATION_RUNS:
        routed = confined_routing(heldout, int(topo_cfg["nodes"]), int(topo_cfg["gpus_per_node"]), kind == "inter")
        trace = save_trace(routed, args.out / f"calibration-{kind}.safetensors")
        out = args.out / "calibration" / f"{kind}-{step_tokens}"
        run_serve(trace, placement, out, argparse.Namespace(**{**vars(args), "dilation": "20000",
                                                               "step_tokens": step_tokens, "steps": steps}))
        dirs.append(out)
    return dirs


def recovered_constants(dirs: list[Path], topo_cfg: dict, trace: Trace) -> dict[str, float]:
    """moetuner-calibrate's fit on the emulated runs (target units) next to the topology's own constants.
    Compute is compared as the expert time per active slot at the loads served (the fit is linear in
    the load, the roofline is not)."""
    runs = read_runs([str(d) for d in dirs])
    fit = fit_costs(stack_runs(runs))
    cost = target_cost(topology_from_config(topo_cfg), trace)
    rows = pd.concat(runs.values(), ignore_index=True)
    rows = rows[rows["active_slots"] > 0]
    slots = rows["active_slots"].sum()
    own_compute = (rows["active_slots"] * cost.expert_time(rows["pairs"] / rows["active_slots"])).sum()
    fit_compute = (fit.expert_fixed_s * rows["active_slots"] + fit.expert_per_token_s * rows["pairs"]).sum()
    own = {"inter_node_bw": float(topo_cfg["inter_node_bw_GBps"]) * 1e9,
           "intra_node_bw": float(topo_cfg["intra_node_bw_GBps"]) * 1e9,
           "expert_time_s": own_compute / slots,
           "inter_node_latency_s": float(topo_cfg["inter_node_latency_us"]) * 1e-6,
           "intra_node_latency_s": float(topo_cfg["intra_node_latency_us"]) * 1e-6}
    got = {"inter_node_bw": fit.inter_node_bw, "intra_node_bw": fit.intra_node_bw, "expert_time_s": fit_compute / slots,
           "inter_node_latency_s": fit.inter_node_latency_s, "intra_node_latency_s": fit.intra_node_latency_s}
    got = {k: float("nan") if v is None else v for k, v in got.items()}
    return {**{f"own_{k}": v for k, v in own.items()}, **{f"fit_{k}": v for k, v in got.items()},
            **{f"fit_rel_error_{k}": abs(got[k] - own[k]) / own[k] for k in own}}


def hot_receiver_check(args: argparse.Namespace) -> None:
    """2 layers, top-1, 16 experts one per rank (contiguous), D = 20000: uniform routing vs half of the
    tokens to rank 0's expert; measured target time vs the simulator's (does a hot port cost what the
    simulator says?)."""
    from moetuner.placement import Placement, contiguous_phy2log
    from moetuner.trace import Trace

    tokens, experts = 1536, 16
    j = np.arange(tokens)
    uniform = (j % 16 + 1 + (j // 16) % 15) % 16  # never the token's home rank
    placement = save_placement(Placement(contiguous_phy2log(2, experts, 16, 1), 16, 2, "contiguous"),
                               args.out / "synthetic-contiguous.json")
    for name, expert in (("uniform", uniform), ("hot", np.where(j % 2 == 0, 0, uniform))):
        ids = np.stack([expert, (expert + 5) % 16], 1)[:, :, None]  # [T, 2 layers, top-1]
        path = save_trace(Trace(topk_ids=ids.astype(np.int16), seq_ids=np.zeros(tokens, np.int32), model="synthetic",
                                num_experts=experts, moe_layers=[0, 1], source="synthetic", hidden_size=2048,
                                moe_intermediate_size=1408), args.out / f"synthetic-{name}.safetensors")
        m = run_serve(path, placement, args.out / f"synthetic-{name}",
                      argparse.Namespace(**{**vars(args), "dilation": "20000", "steps": 2, "warmup": 1}))
        print(f"synthetic {name}: measured {1e6 * m['target_moe_layer_time_s']:.1f} us, predicted "
              f"{1e6 * m['predicted_moe_layer_time_s']:.1f} us ({m['prediction_rel_error']:+.1%})")


def main() -> None:
    args = parse_args()
    if args.hot_receiver_check:
        args.out.mkdir(parents=True, exist_ok=True)
        hot_receiver_check(args)
        return
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    if netns_unavailable_reason():
        raise SystemExit(f"the emulated links need shaped network namespaces but {netns_unavailable_reason()}: "
                         f"runs on unshaped loopback measure nothing of the target; run as root")
    profile, heldout = split_by_sequence(routing(), args.holdout, seed=0)
    held_path = save_trace(heldout, args.out / "heldout.safetensors")
    topo_cfg = topology_preset(args.topology)
    rows = []
    for spec in args.placements:
        name, replicas = spec.split(":")
        label = f"{name}-r{replicas}"
        path = save_placement(solve(name, int(replicas), profile, topo_cfg, args), args.out / f"{label}.json")
        runs = [run_serve(held_path, path, args.out / label / f"rep{i}", args) for i in range(args.repeats)]
        measured = np.array([m["target_moe_layer_time_s"] for m in runs])
        predicted = runs[0]["predicted_moe_layer_time_s"]
        comm = np.array([m.get("measured_comm_s", np.nan) for m in runs])
        rows.append({"placement": label, "predicted_us": 1e6 * predicted, "measured_us": 1e6 * measured.mean(),
                     "rel_error": measured.mean() / predicted - 1,
                     "injected_share": runs[0]["injected_share"],
                     "transfer_error": comm.mean() / runs[0].get("predicted_comm_s", np.nan) - 1,
                     "cv": measured.std(ddof=1) / measured.mean() if len(measured) > 1 else float("nan"),
                     "dilation": runs[0]["dilation"], "cpu_share": float(np.mean([m["cpu_share"] for m in runs])),
                     "measured_runs_us": " ".join(f"{1e6 * v:.0f}" for v in measured)})
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    base = table.set_index("placement").iloc[0]
    table["measured_speedup"] = base["measured_us"] / table["measured_us"] - 1
    table["predicted_speedup"] = base["predicted_us"] / table["predicted_us"] - 1
    spearman = float(table["measured_us"].corr(table["predicted_us"], method="spearman"))
    constants = recovered_constants(calibration_runs(heldout, topo_cfg, args), topo_cfg, heldout)
    best = table.iloc[table["measured_us"].idxmin()]
    wall = time.monotonic() - start
    summary = {"spearman": spearman, "max_abs_rel_error": float(table["rel_error"].abs().max()),
               "max_cv": float(table["cv"].max()), "wall_s": wall, "best_placement": best["placement"],
               "best_measured_speedup": float(best["measured_speedup"]), "paper_speedup": PAPER_SPEEDUP,
               **constants}
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print(json.dumps(summary, indent=1))
    names = [k.removeprefix("own_") for k in constants if k.startswith("own_")]
    recovered = {k: (constants[f"own_{k}"], constants[f"fit_{k}"], constants[f"fit_rel_error_{k}"]) for k in names}
    print(pd.DataFrame(recovered, index=["topology", "calibrated", "rel_error"]).T.to_markdown(floatfmt=".4g"))
    aims = {"every placement within 10%": summary["max_abs_rel_error"] <= 0.10, "Spearman >= 0.9": spearman >= 0.9,
            "CV <= 5%": summary["max_cv"] <= 0.05, "<= 10 min": wall <= 600,
            "calibration within 10%": all(e <= 0.10 for _, _, e in recovered.values())}
    print("aims:", ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in aims.items()))
    write_atomic(args.out / "serve_emulated.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_json_atomic(args.out / "summary.json",
                      {**summary, "aims": aims, "args": {k: str(v) for k, v in vars(args).items()}})
    cfg = {"mlflow": {"experiment": "benchmarks"}, "args": {k: str(v) for k, v in vars(args).items()}}
    with tracked_run("serve_emulated", cfg, tags={"dataset": "esft-intent", "topology": args.topology}) as run:
        for r in table.to_dict("records"):
            run.log_metrics({f"{r['placement']}.{k}": v for k, v in r.items()
                             if isinstance(v, (int, float)) and k != "placement"})
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_artifact(args.out / "serve_emulated.csv")


if __name__ == "__main__":
    main()
