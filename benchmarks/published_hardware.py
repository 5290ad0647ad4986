"""Reproduce DeepSeek's published H800 kernel tables with the calibrated cost model (CPU only).

    .venv/bin/python benchmarks/published_hardware.py --out docs/results/published_hardware

Fits the `efficiency` GEMM curve and the link constants on the fit split (moetuner.hardware.fit
FIT_RULES: GEMMs on DeepSeek-V3's expert shapes at M >= 128, communication on EP <= 32), then simulates
every published number of data/published/ and writes DIR/rows.csv (source, table, kind, ep, tokens, m, n,
k, unit, published, simulated, rel_error, used_in_fit), DIR/summary.csv (error by table and split) and
DIR/calibration.yaml (the topology `calibration` block the h800 presets carry).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.hardware.fit import error_summary, fit_published, write_fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "published_hardware")
    p.add_argument("--seed", type=int, default=0, help="routing of the DeepEP workloads")
    args = p.parse_args()
    start = time.perf_counter()
    fit = fit_published(args.seed)
    write_fit(fit, args.out, f"benchmarks/published_hardware.py --seed {args.seed}")
    print(fit.rows.to_markdown(index=False, floatfmt=".3g"))
    print(error_summary(fit.rows).to_markdown(index=False, floatfmt=".3f"))
    print(OmegaConf.to_yaml(OmegaConf.create({"calibration": fit.calibration()})))
    print(f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
