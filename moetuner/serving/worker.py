"""The per-rank program: `python -m moetuner.serving.worker DIR/config.yaml` (started by torchrun).

Reads the resolved config the app wrote, joins the process group (NCCL with CUDA, else gloo), runs
replay or model mode, gathers every rank's per-layer rows on rank 0, which writes DIR/metrics.json,
DIR/per_layer.csv and logs one MLflow run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from moetuner.atomic import write_atomic, write_json_atomic
from moetuner.placement import load_placement
from moetuner.serving.emulation import (RankEmulator, add_predictions, cpu_share, emulation_metrics,
                                        predict_served, predict_transfers, row_scale, target_cost, wire_row_bytes)
from moetuner.serving.ep_moe import set_exchange_hook
from moetuner.serving.measure import PER_LAYER_COLUMNS, Cluster, summarize
from moetuner.serving.replay import replay, replay_settings
from moetuner.costmodel.cost import cost_model
from moetuner.topology import topology_from_config
from moetuner.tracking import tracked_run
from moetuner.trace import Trace, load_trace


def status_path(out: Path, rank: int) -> Path:
    return out / "status" / f"rank{rank}.json"


def report_status(out: Path, rank: int, phase: str) -> None:
    """Tell the launcher what this rank is doing (it names the rank and phase when a job fails)."""
    write_json_atomic(status_path(out, rank), {"rank": rank, "pid": os.getpid(), "phase": phase})


def maybe_fail(cfg: DictConfig, rank: int, phase: str) -> None:
    """Fault injection for the failure tests: `fault.rank` dies (SIGKILL) or hangs at `fault.phase`."""
    fault = cfg.get("fault") or {}
    if fault.get("rank") == rank and fault.get("phase", "run") == phase:
        if fault.get("kind", "kill") == "hang":
            signal.pause()
        os.kill(os.getpid(), signal.SIGKILL)


def rank_emulator(cfg: DictConfig, trace: Trace, rank: int) -> RankEmulator | None:
    """The emulation of this rank (latency hook installed), or None when the run is not emulated."""
    if not cfg.get("emulation") or not cfg.emulation.enabled:
        return None
    hidden = max(1, trace.hidden_size // int(cfg.replay.shape_scale))
    emulator = RankEmulator(target_cost(topology_from_config(cfg.topology), trace), float(cfg.emulation.dilation),
                            rank, wire_row_bytes(hidden, trace.top_k))
    set_exchange_hook(emulator)
    return emulator


def run_replay(cfg: DictConfig, cluster: Cluster, rank: int, phy2log: np.ndarray) -> tuple[list, int, float, dict]:
    trace = load_trace(cfg.trace)
    settings = replay_settings(cfg.replay)
    delivered = None
    if cfg.replay.get("check_delivery"):
        delivered = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.int32)
    emulator = rank_emulator(cfg, trace, rank)
    timed = emulator is not None and cfg.emulation.compute == "timed"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rows, tokens, wall = replay(trace, phy2log, settings, cluster, rank, delivered,
                                expert_fn=emulator.expert if timed else None,
                                on_step=emulator.start_step if emulator else None,
                                cost=cost_model(topology_from_config(cfg.topology), trace.hidden_size,
                                                trace.moe_intermediate_size))
    extra: dict = {"dataflow": settings.dataflow, "dispatch": settings.dispatch}
    if emulator is not None:  # the ranks' CPU work, for emulation_outputs' cpu_share
        extra.update({f"cpu_s_rank{rank}": time.process_time() - cpu0,
                      f"run_s_rank{rank}": time.perf_counter() - wall0})
    if delivered is not None:
        total = torch.from_numpy(delivered)
        dist.all_reduce(total)
        if rank == 0:
            np.save(Path(cfg.out) / "delivered.npy", total.numpy())
    return rows, tokens, wall, extra


def emulation_outputs(cfg: DictConfig, table: pd.DataFrame, metrics: dict) -> tuple[pd.DataFrame, dict]:
    """Rank 0 of an emulated replay: the prediction beside each per_layer row, and the emulation's metrics
    (dilation, ranks, shaped links, target and predicted MoE-layer time, what of it was injected from the
    model and the error on the transfers alone, the ranks' CPU share of the run)."""
    trace = load_trace(cfg.trace)
    topology = topology_from_config(cfg.topology)
    settings = replay_settings(cfg.replay)
    warmup, dilation = settings.warmup_steps, float(cfg.emulation.dilation)
    cost = target_cost(topology, trace)
    phy2log = load_placement(cfg.placement).phy2log
    sim = predict_served(trace, phy2log, cost, settings)
    world = topology.num_gpus
    cpu = sum(metrics.pop(f"cpu_s_rank{r}") for r in range(world))
    run_s = max(metrics.pop(f"run_s_rank{r}") for r in range(world))
    steps = metrics["steps"] + warmup
    compute = str(cfg.emulation.compute)
    emulated = emulation_metrics(metrics["moe_layer_time_s"], sim, predict_transfers(trace, phy2log, cost, settings),
                                 dilation, world, compute, bool(cfg.launch.get("emulated_network", False)))
    emulated.update(compute=compute, cpu_s_per_step=cpu / steps,
                    target_bytes_per_byte=1 / row_scale(trace, settings.shape_scale, cost),
                    cpu_share=cpu_share(cpu, run_s, len(os.sched_getaffinity(0))))
    return add_predictions(table, sim, warmup, dilation), emulated


def log_run(cfg: DictConfig, metrics: dict) -> None:
    """The serve job's MLflow run: its metrics, metrics.json and per_layer.csv."""
    out = Path(cfg.out)
    tags = {"mode": cfg.mode, "topology": cfg.topology.name, "dataflow": str(metrics.get("dataflow"))}
    with tracked_run("serve", cfg, tags=tags) as run:
        run.log_metrics(metrics)
        for name in ("metrics.json", "per_layer.csv"):
            run.log_artifact(out / name)


def write_outputs(cfg: DictConfig, rows: list[dict], tokens: int, wall: float, extra: dict) -> dict:
    """Rank 0: per_layer.csv and metrics.json (atomic), and the MLflow run unless the ranks run in network
    namespaces, which cannot reach a tracking server on the host (moetuner-serve logs it then)."""
    out = Path(cfg.out)
    table = pd.DataFrame(rows, columns=PER_LAYER_COLUMNS)
    metrics = summarize(table, tokens, wall)
    metrics.update(extra)
    metrics["emulated_network"] = bool(cfg.launch.get("emulated_network", False))
    if cfg.mode == "replay" and cfg.get("emulation") and cfg.emulation.enabled:
        table, emulated = emulation_outputs(cfg, table, metrics)
        metrics.update(emulated)
    write_atomic(out / "per_layer.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_json_atomic(out / "metrics.json", metrics)
    if not metrics["emulated_network"]:
        log_run(cfg, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    assert len(argv) == 1, "usage: python -m moetuner.serving.worker DIR/config.yaml"
    cfg = OmegaConf.load(argv[0])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(cfg.out)
    report_status(out, rank, "init")
    maybe_fail(cfg, rank, "init")
    emulated = bool(cfg.get("emulation") and cfg.emulation.enabled)  # many ranks share this CPU: gloo
    backend = "nccl" if torch.cuda.is_available() and not emulated else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=float(cfg.launch.timeout_s)))
    topology = topology_from_config(cfg.topology)
    cluster = Cluster(world, topology.gpus_per_node)
    assert world == topology.num_gpus, f"world size {world} != topology GPUs {topology.num_gpus}"
    phy2log = load_placement(cfg.placement).phy2log
    torch.set_num_threads(int(cfg.launch.get("threads_per_rank") or 1))
    report_status(out, rank, "run")
    maybe_fail(cfg, rank, "run")
    if cfg.mode == "replay":
        rows, tokens, wall, extra = run_replay(cfg, cluster, rank, phy2log)
    else:
        from moetuner.serving.model import run_model

        rows, tokens, wall, extra = run_model(cfg, cluster, rank, phy2log)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((rows, wall, extra), gathered, dst=0)
    report_status(out, rank, "done")
    if rank == 0:
        all_rows = [r for part in gathered for r in part[0]]
        merged = {k: v for part in gathered for k, v in part[2].items()}
        merged.update(combine_checks([part[2] for part in gathered]))
        write_outputs(cfg, all_rows, tokens, max(part[1] for part in gathered), merged)
    dist.barrier()
    dist.destroy_process_group()


def combine_checks(extras: list[dict]) -> dict:
    """Model mode: the logits match on every rank, and the largest difference over ranks."""
    if not any("max_abs_diff" in e for e in extras):
        return {}
    return {"logits_match": all(e["logits_match"] for e in extras),
            "max_abs_diff": max(e["max_abs_diff"] for e in extras)}


if __name__ == "__main__":
    main()
