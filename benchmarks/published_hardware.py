"""Reproduce DeepSeek's published kernel tables with the calibrated cost model (CPU only).

    .venv/bin/python benchmarks/published_hardware.py --out docs/results/published_hardware

Fits the tile form of the `efficiency` GEMM model and the link constants on the fit split
(moetuner.hardware.fit FIT_RULES: GEMMs at M >= 128 of every shape, communication on EP <= 32), then
simulates every published number of data/published/ and writes DIR/rows.csv (every number with its GPU,
kernel version and upstream commit, DeepGEMM's block shape, tiles and waves, published, simulated,
rel_error, split), DIR/summary.csv (error by GPU, table and split, with the count of independent
measurements), DIR/gemm.csv and DIR/comm.csv (the TFLOPS rows and the DeepEP rows, for docs/hardware.md),
DIR/experts_288_vs_256.csv, DIR/calibration.yaml (the topology `calibration` block the h800 presets carry),
DIR/calibration_{h100,h200,b200}.yaml and DIR/borrowed.csv (moetuner.hardware.classes: the blocks of the
other presets and where each constant a class does not fit comes from) and DIR/run.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.atomic import write_atomic
from moetuner.hardware.classes import fit_everything, write_classes
from moetuner.hardware.fit import error_summary, write_fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import command_line, write_run_record  # noqa: E402

GEMM_COLUMNS = ["table", "tokens", "m", "n", "k", "block_m", "block_n", "tiles", "waves", "published", "simulated",
                "rel_error", "split"]
COMM_COLUMNS = ["preset", "table", "gpu", "measured_commit", "kind", "ep", "unit", "published", "simulated",
                "rel_error", "split"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "published_hardware")
    p.add_argument("--seed", type=int, default=0, help="routing of the DeepEP workloads")
    args = p.parse_args()
    start = time.perf_counter()
    fit, classes = fit_everything(args.seed)
    write_fit(fit, args.out, f"benchmarks/published_hardware.py --seed {args.seed}")
    write_classes(classes, args.out, f"benchmarks/published_hardware.py --seed {args.seed}")
    rows = fit.rows
    counts = ["tokens", "m", "n", "k", "block_m", "block_n", "tiles", "waves"]
    gemm = rows[rows["kind"] == "tflops"][GEMM_COLUMNS].astype({c: int for c in counts})
    comm = rows[rows["ep"].notna()][COMM_COLUMNS].astype({"ep": int})
    comm["measured_commit"] = comm["measured_commit"].str[:7]
    write_atomic(args.out / "gemm.csv", lambda tmp: gemm.to_csv(tmp, index=False, float_format="%.4g"))
    write_atomic(args.out / "comm.csv", lambda tmp: comm.to_csv(tmp, index=False, float_format="%.4g"))
    print(rows.to_markdown(index=False, floatfmt=".3g"))
    print(error_summary(rows).to_markdown(index=False, floatfmt=".3f"))
    print(OmegaConf.to_yaml(OmegaConf.create({"calibration": fit.calibration()})))
    wall = time.perf_counter() - start
    write_run_record(args.out, command_line("published_hardware.py", sys.argv[1:]),
                     f"2 shared CPU cores, {wall:.0f} s wall; no GPU measured anything")
    print(f"wall {wall:.1f} s")


if __name__ == "__main__":
    main()
