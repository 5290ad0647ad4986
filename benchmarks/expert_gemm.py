"""Time real expert GEMMs on a GPU and write calibrated topologies (GPU only).

    .venv/bin/python benchmarks/expert_gemm.py --topology h200_2x8 --out results/expert_gemm

For each expert shape (Mixtral 4096x14336, DeepSeek-V2-Lite 2048x1408, DeepSeek-V3 7168x2048) and
token count, times one SwiGLU expert (x @ gate_up [H, 2I], silu * up, @ down [I, H]) in bf16 with
CUDA events, fits t(n) = expert_fixed_s + expert_per_token_s * n (least squares, non-negative) and
writes `<topology>_<shape>.yaml`: the topology with that `calibration` block, for the simulator.
Without CUDA it exits with status 1 and says so: the roofline defaults of the topologies stay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.topology import topology_preset
from moetuner.atomic import write_atomic, write_text_atomic
from moetuner.serving.calibration import nonneg_lstsq
from moetuner.tracking import tracked_run

SHAPES = {"mixtral": (4096, 14336), "deepseek_v2_lite": (2048, 1408), "deepseek_v3": (7168, 2048)}
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)


def time_expert(hidden: int, inter: int, tokens: int, reps: int) -> float:
    """Median seconds of one SwiGLU expert on `tokens` tokens (bf16, CUDA events)."""
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden ** 0.5
    down = torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16) / inter ** 0.5

    def expert() -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    for _ in range(3):
        expert()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        expert()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="h200_2x8")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "expert_gemm")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("expert_gemm: no CUDA GPU here; nothing was timed and no calibration file was written. "
                 "The h100/h200 topologies keep their roofline defaults. Run this on a GPU machine.")
    rows = [{"shape": name, "tokens": n, "seconds": time_expert(h, i, n, args.reps)}
            for name, (h, i) in SHAPES.items() for n in TOKENS]
    table = pd.DataFrame(rows)
    base = topology_preset(args.topology)
    fits = {}
    for name, part in table.groupby("shape"):
        fixed, per_token = nonneg_lstsq(np.column_stack([np.ones(len(part)), part["tokens"]]),
                                        part["seconds"].to_numpy())
        fits[name] = {"expert_fixed_s": float(fixed), "expert_per_token_s": float(per_token)}
        topo = {**base, "name": f"{args.topology}_{name}", "calibration": fits[name]}
        write_text_atomic(args.out / f"{args.topology}_{name}.yaml", OmegaConf.to_yaml(OmegaConf.create(topo)))
    print(table.pivot(index="tokens", columns="shape", values="seconds").mul(1e6).to_markdown(floatfmt=".1f"))
    print(pd.DataFrame(fits).T.to_markdown(floatfmt=".3g"))
    write_atomic(args.out / "expert_gemm.csv", lambda tmp: table.to_csv(tmp, index=False))
    cfg = {"mlflow": {"experiment": "benchmarks"}, "args": {k: str(v) for k, v in vars(args).items()},
           "device": torch.cuda.get_device_name()}
    with tracked_run("expert_gemm", cfg, tags={"topology": args.topology}) as run:
        run.log_metrics({f"{s}.{k}": v for s, f in fits.items() for k, v in f.items()})
        run.log_artifact(args.out)


if __name__ == "__main__":
    main()
