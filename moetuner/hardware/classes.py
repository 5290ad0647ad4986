"""Calibration blocks for the GPU classes the study's presets name (h100_*, h200_*, b200_*): each constant is
fitted on the class's own published rows where they determine it, and otherwise borrowed from the H800 fit
by a stated rule (docs/hardware.md, "Presets per GPU class").

The split is fixed before fitting (CLASS_RULES). Rows come from data/published/ (hybrid_ep_h100, deepep_v2,
hybrid_ep_b200), simulated with moetuner.hardware.fit's workloads: Hybrid-EP routes 4096 tokens per rank
uniformly to 8 experts per rank; DeepEP V2 8192 tokens per rank to V3's 256 experts. Their "algorithm" or
"logical" bandwidth is read as DeepEP's: intranode, the tokens a rank receives (its own included);
internode, the distinct (token, node) pairs a rank sends (its own node included); x bytes / phase time.
The model has no SM count: only rows at a kernel's largest published SM count are fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from moetuner.atomic import write_atomic, write_text_atomic
from moetuner.hardware.fit import (BENCH_TOKENS, ROW_COLUMNS, SMS, Gemm, HardwareFit, Links, calibration_block,
                                   comm_bench, fit_links, fit_published, simulate_comm)
from moetuner.published import TABLES, load_table

# Vendor figures that carry a constant from one GPU to another (not fitted): dense FP8 TFLOP/s, HBM GB/s,
# NVLink GB/s per direction.
VENDOR = {"H800": (1979.0, 3350.0, 200.0), "H100": (1979.0, 3350.0, 450.0), "H200": (1979.0, 4800.0, 450.0),
          "B200": (4500.0, 8000.0, 900.0)}
CLASS_RULES = {
    "h100": "fit: Hybrid-EP H100 kernel-only at 16 SMs, EP 16 and 32 (dispatch FP8, combine): inter-node "
            "bandwidth and latency; validation: the same at EP 64, and DeepEP V2 SM90 EP 16 and 32",
    "b200": "fit: DeepEP V2 SM100 EP 8 at 64 SMs and EP 8x2 (dispatch, combine): intra- and inter-node "
            "bandwidth and latency; validation: Hybrid-EP B200 EP 8 (Hybrid-EP at 16 SMs, kernel only and Torch "
            "API; DeepEP Torch API at 48 SMs)",
}
FREE = {"h100": ("inter_node_bw_GBps", "inter_node_latency_us"),
        "b200": ("intra_node_bw_GBps", "intra_node_latency_us", "inter_node_bw_GBps", "inter_node_latency_us")}
CLASS_GPU = {"h100": "H100", "h200": "H200", "b200": "B200"}


def class_comm_rows() -> pd.DataFrame:
    """The published communication rows each class is fitted or validated on, one per number: source, table,
    gpu, kernel, measured_commit, kind, ep, tokens, unit, published, preset, used_in_fit, split."""
    rows = []

    def add(table: str, r: object, preset: str, op: str, value: float, split: str) -> None:
        rows.append({"source": TABLES[table].upstream_repository, "table": table, "gpu": r.gpu, "kernel": r.kernel,
                     "measured_commit": r.measured_commit, "kind": f"{op}_bandwidth", "ep": int(r.num_ep),
                     "tokens": BENCH_TOKENS[table], "unit": "GB/s", "published": float(value), "preset": preset,
                     "split": split})

    h100 = load_table("hybrid_ep_h100")
    for r in h100[h100["num_sms"] == 16].itertuples():
        split = "fit" if r.num_ep <= 32 else "validation"
        add("hybrid_ep_h100", r, "h100", "dispatch", r.kernel_dispatch_fp8_gbps, split)
        add("hybrid_ep_h100", r, "h100", "combine", r.kernel_combine_gbps, split)
    for r in load_table("deepep_v2").itertuples():
        if r.gpu == "SM90":
            preset, split = "h100", "validation"
        elif r.num_ep == 16 or r.num_sms == 64:  # SM100 at its largest SM count
            preset, split = "b200", "fit"
        else:
            continue  # SM100 EP 8 at 24 SMs ("Min #SM"): the model has no SM count
        add("deepep_v2", r, preset, "dispatch", r.dispatch_bandwidth_gbps, split)
        add("deepep_v2", r, preset, "combine", r.combine_bandwidth_gbps, split)
    b200 = load_table("hybrid_ep_b200")
    for r in b200[(b200["implementation"] == "HybridEP") | (b200["num_sms"] == b200["num_sms"].max())].itertuples():
        add("hybrid_ep_b200", r, "b200", "dispatch", r.dispatch_fp8_gbps, "validation")
        add("hybrid_ep_b200", r, "b200", "combine", r.combine_gbps, "validation")
    out = pd.DataFrame(rows)
    out["used_in_fit"] = out["split"] == "fit"
    return out


def scaled_gemm(h800: Gemm, gpu: str) -> Gemm:
    """The H800 GEMM fit carried to `gpu`: per-SM FP8 rate scaled by the vendor's dense FP8 per SM, HBM by the
    vendor's HBM bandwidth; per-SM load rate, overlap, tile and kernel costs kept."""
    flops, hbm, _ = VENDOR[gpu]
    flops_800, hbm_800, _ = VENDOR["H800"]
    per_sm = (flops / SMS[gpu]) / (flops_800 / SMS["H800"])
    return replace(h800, gemm_sm_tflops=h800.gemm_sm_tflops * per_sm, gemm_mem_bw_GBps=h800.gemm_mem_bw_GBps * hbm / hbm_800)


def start_links(h800: Links, gpu: str) -> Links:
    """The H800 link fit carried to `gpu`: NVLink scaled by the vendor's NVLink ratio, the rest kept."""
    return replace(h800, intra_node_bw_GBps=h800.intra_node_bw_GBps * VENDOR[gpu][2] / VENDOR["H800"][2])


@dataclass(frozen=True)
class ClassFit:
    """One preset class: its GEMM and link constants, and where each constant that is not fitted comes from."""

    name: str
    gemm: Gemm
    links: Links
    borrowed: dict[str, str]  # BORROWED[name]

    def calibration(self) -> dict[str, object]:
        return calibration_block(self.gemm, self.links, SMS[CLASS_GPU[self.name]])


_SAME_SM90 = "H800 GEMM fit (same SM90 die: 132 SMs, same FP8 rate)"
_H800_GEMM = "H800 GEMM fit"
_GEMM_KEPT = {k: _H800_GEMM for k in ("gemm_sm_load_GBps", "gemm_overlap_q", "gemm_tile_us", "gemm_kernel_us")}
BORROWED = {  # calibration key -> where its value comes from, for every constant a class does not fit itself
    "h100": {"gemm_sm_tflops": _SAME_SM90, "gemm_mem_bw_GBps": "H800 GEMM fit (H100 SXM has the H800's HBM, 3350 GB/s)",
             **_GEMM_KEPT,
             "intra_node_bw_GBps": "H800 link fit x vendor NVLink per direction (450 / 200 GB/s)",
             "intra_node_latency_us": "H800 link fit", "message_us": "H800 link fit"},
    "h200": {"gemm_sm_tflops": _SAME_SM90, "gemm_mem_bw_GBps": "H800 GEMM fit x vendor HBM (4800 / 3350 GB/s)",
             **_GEMM_KEPT, "intra_node_bw_GBps": "H800 link fit x vendor NVLink per direction (450 / 200 GB/s)",
             "intra_node_latency_us": "H800 link fit", "message_us": "H800 link fit",
             "inter_node_bw_GBps": "h100 class fit (same NVLink and CX7 NICs)",
             "inter_node_latency_us": "h100 class fit (same NVLink and CX7 NICs)"},
    "b200": {"gemm_sm_tflops": "H800 GEMM fit x vendor dense FP8 per SM ((4500 / 148) / (1979 / 132))",
             "gemm_mem_bw_GBps": "H800 GEMM fit x vendor HBM (8000 / 3350 GB/s)", **_GEMM_KEPT,
             "message_us": "H800 link fit"},
}


def fit_classes(h800_gemm: Gemm, h800_links: Links, seed: int = 0) -> tuple[dict[str, ClassFit], pd.DataFrame]:
    """Fit every class on its CLASS_RULES rows; -> (classes by name, the class rows with simulated values and
    rel_error)."""
    rows = class_comm_rows()
    benches = [comm_bench(t, int(ep), seed) for t, ep in sorted(set(zip(rows["table"], rows["ep"])))]
    links = {}
    for name in ("h100", "b200"):
        own = rows[(rows["preset"] == name) & rows["used_in_fit"]]
        links[name] = fit_links(own, own["published"].to_numpy(float), benches,
                                start_links(h800_links, CLASS_GPU[name]), FREE[name])
    simulated = np.empty(len(rows))
    for name, fitted in links.items():
        mask = (rows["preset"] == name).to_numpy()
        simulated[mask] = simulate_comm(rows[mask], fitted, benches)
    rows = rows.assign(simulated=simulated, rel_error=simulated / rows["published"].to_numpy(float) - 1)
    classes = {"h100": ClassFit("h100", scaled_gemm(h800_gemm, "H100"), links["h100"], BORROWED["h100"]),
               "h200": ClassFit("h200", scaled_gemm(h800_gemm, "H200"), links["h100"], BORROWED["h200"]),
               "b200": ClassFit("b200", scaled_gemm(h800_gemm, "B200"), links["b200"], BORROWED["b200"])}
    return classes, rows


def fit_everything(seed: int = 0) -> tuple[HardwareFit, dict[str, ClassFit]]:
    """The H800 fit, then every class from it; the HardwareFit's rows hold every class's rows too."""
    h800 = fit_published(seed)
    classes, rows = fit_classes(h800.gemm, h800.links, seed)
    return replace(h800, rows=pd.concat([h800.rows, rows.reindex(columns=ROW_COLUMNS)], ignore_index=True)), classes


def write_classes(classes: dict[str, ClassFit], out: Path, command: str) -> list[Path]:
    """out/calibration_<class>.yaml (the block, headed by its rule and its borrowed constants) and
    out/borrowed.csv (class, key, value, source)."""
    from omegaconf import OmegaConf

    paths = []
    for name, fitted in classes.items():
        rule = CLASS_RULES["h100" if name == "h200" else name]
        header = [f"# fitted by {command} on data/published/ ({rule})",
                  *[f"# {key}: {source}" for key, source in fitted.borrowed.items()]]
        block = OmegaConf.to_yaml(OmegaConf.create({"calibration": fitted.calibration()}))
        paths.append(write_text_atomic(out / f"calibration_{name}.yaml", "\n".join(header) + "\n" + block))
    table = pd.DataFrame([{"preset": name, "key": key, "value": fitted.calibration()[key], "source": source}
                          for name, fitted in classes.items() for key, source in fitted.borrowed.items()])
    paths.append(write_atomic(out / "borrowed.csv", lambda tmp: table.to_csv(tmp, index=False)))
    return paths
