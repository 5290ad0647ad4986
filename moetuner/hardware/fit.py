"""Fit the cost model's hardware constants to DeepSeek's published H800 kernel tables (data/published/).

Each published number is reproduced by simulating the benchmark's own workload and deriving the quantity
the table reports, with the benchmark's own byte conventions:

- DeepGEMM FP8 GEMMs (dense, grouped contiguous, grouped masked): the tile form of the `efficiency` expert
  model (costmodel/tiles.py) times one kernel of `groups` GEMMs of M = m_per_group rows on the GPU's SMs,
  with DeepGEMM's own block shapes, tiles and waves;
  TFLOPS = 2 * groups * m * N * K / t, GB/s = groups * (m*K + N*K + 2*m*N) / t (FP8 in, BF16 out; the
  README's numbers satisfy this byte count to 0.2%).
- DeepEP normal kernels (4096 tokens per rank, top-8 of 256 experts spread EP-wise contiguously, groups =
  nodes with the top min(nodes, 4) kept, as DeepEP's tests/test_internode.py routes): one layer through the
  simulator's a2a phase model, `dispatch_combine` on one node and `hierarchical` across nodes. "Bottleneck
  bandwidth" is DeepEP's logical bandwidth: intranode, the tokens a rank receives (distinct token-GPU pairs,
  its own included) x bytes / phase time; internode, the distinct (token, node) pairs a rank sends, its own
  node included, x bytes / phase time. Bytes: FP8 dispatch h + h/128*4 (scales), BF16 combine 2h.
- DeepEP low-latency kernels (128 tokens per rank, top-8 of 288 experts at EP 8-32 as DeepEP's test runs
  them, of 256 at EP 64-256 where 288 does not divide, no group limit): one layer of the
  `low_latency` dataflow; latency = phase time, bandwidth = the rank's token-expert pairs x (h + h/128*4 + 16)
  for dispatch (tests/test_low_latency.py's count) or x 2h for combine, / phase time.

The fit/validation split is fixed before fitting (FIT_RULES): GEMMs are fitted on every shape and layout at
M >= 128 (DeepGEMM's BLOCK_M = 128) and checked on M = 64 (BLOCK_M = 64), the four non-expert dense shapes
included; communication is fitted on EP <= 32 and checked on EP 64; the low-latency rows of EP 128 and 256,
which DeepEP's older kernel measured, are reported as their own group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from moetuner.atomic import write_atomic, write_text_atomic
from moetuner.costmodel.cost import (SCALE_BYTES, CostModel, a2a_time, copy_matrix, pair_copy_matrix, phases,
                                     relay_copies)
from moetuner.costmodel.tiles import TileGemm, block_shape, cdiv, tile_count, tile_gemm
from moetuner.published import TABLES, load_table
from moetuner.topology import GB

HIDDEN = 7168  # DeepSeek-V3/R1
EXPERTS, TOP_K, GPUS_PER_NODE = 256, 8, 8
LL_TEST_EXPERTS = 288  # DeepEP's tests/test_low_latency.py: num_experts = 288 (it asserts 288 % EP == 0)
FP8_TOKEN_BYTES = HIDDEN + HIDDEN // 128 * SCALE_BYTES  # FP8 values + one float32 scale per 128
LL_DISPATCH_BYTES = FP8_TOKEN_BYTES + 16  # tests/test_low_latency.py counts 16 more bytes per pair
BF16_TOKEN_BYTES = 2 * HIDDEN
ROW_COLUMNS = ["source", "table", "gpu", "kernel", "measured_commit", "kind", "ep", "tokens", "m", "n", "k",
               "block_m", "block_n", "tiles", "waves", "unit", "preset", "published", "simulated", "rel_error", "used_in_fit", "split"]
PROVENANCE = ["gpu", "kernel", "measured_commit"]
OLDER_KERNEL = "DeepEP V1, first release"  # low-latency EP 128/256: not re-measured by de8cfca
FIT_RULES = {"gemm": "M >= 128 (BLOCK_M 128), every shape and layout; M = 64 (BLOCK_M 64) is validation",
             "comm": "EP <= 32; low-latency rows of the older kernel (EP 128/256) form their own group"}


@dataclass(frozen=True)
class Links:
    """Communication constants of the calibrated model (GB/s, us), `concurrent` link model."""

    intra_node_bw_GBps: float
    inter_node_bw_GBps: float
    intra_node_latency_us: float
    inter_node_latency_us: float
    message_us: float

    def cost(self, num_gpus: int) -> CostModel:
        """The CostModel of an H800 cluster of num_gpus / 8 nodes with these links, FP8 dispatch, BF16 combine."""
        node = np.arange(num_gpus) // GPUS_PER_NODE
        same = node[:, None] == node[None, :]
        bandwidth = np.where(same, self.intra_node_bw_GBps, self.inter_node_bw_GBps) * GB
        np.fill_diagonal(bandwidth, np.inf)
        latency = np.where(same, self.intra_node_latency_us, self.inter_node_latency_us) * 1e-6
        np.fill_diagonal(latency, 0.0)
        return CostModel(0.0, 0.0, 0.0, float(BF16_TOKEN_BYTES), bandwidth, latency, node,
                         scatter_bytes=float(FP8_TOKEN_BYTES), combine_bytes=float(BF16_TOKEN_BYTES),
                         message_s=self.message_us * 1e-6, link_model="concurrent")


@dataclass(frozen=True)
class Gemm:
    """Fitted constants of the tile form of the `efficiency` expert model (costmodel/tiles.py), in the units of
    the calibration keys: TFLOP/s and GB/s per SM, GB/s of HBM, overlap exponent, us per tile and per kernel."""

    gemm_sm_tflops: float
    gemm_sm_load_GBps: float
    gemm_mem_bw_GBps: float
    gemm_overlap_q: float
    gemm_tile_us: float
    gemm_kernel_us: float

    def tiles(self, num_sms: int) -> TileGemm:
        return tile_gemm({**asdict(self), "gemm_num_sms": num_sms})


LAYOUT_OF = {"deepgemm_dense": "dense", "deepgemm_grouped_contiguous": "contiguous",
             "deepgemm_grouped_masked": "masked"}
SMS = {"H800": 132, "H100": 132, "H200": 132, "B200": 148}  # streaming multiprocessors per GPU


def gemm_seconds(gemm: Gemm, rows: pd.DataFrame) -> np.ndarray:
    """Seconds of each row's kernel on its GPU's SMs (rows as gemm_rows()). -> [R]"""
    return np.array([gemm.tiles(SMS[r.gpu]).kernel_time(int(r.m), int(r.n), int(r.k), int(r.groups),
                                                        LAYOUT_OF[r.table]) for r in rows.itertuples()])


def gemm_tiles(rows: pd.DataFrame) -> pd.DataFrame:
    """DeepGEMM's block shape, output tiles and waves of each row (rows as gemm_rows()):
    columns block_m, block_n, tiles, waves. [R]"""
    out = []
    for r in rows.itertuples():
        layout, sms = LAYOUT_OF[r.table], SMS[r.gpu]
        block = block_shape(int(r.m), int(r.n), int(r.groups), sms, layout)
        tiles = tile_count(int(r.m), int(r.n), int(r.groups), block, layout)
        out.append({"block_m": block[0], "block_n": block[1], "tiles": tiles, "waves": int(cdiv(tiles, sms))})
    return pd.DataFrame(out, index=rows.index)


def gemm_rows() -> pd.DataFrame:
    """Every DeepGEMM row: source, table, groups, m (per group), n, k, tflops, gbps, used_in_fit."""
    parts = []
    for name in ("deepgemm_dense", "deepgemm_grouped_contiguous", "deepgemm_grouped_masked"):
        t = load_table(name)
        groups = t["num_groups"] if "num_groups" in t else pd.Series(1, index=t.index)
        m = t["m_per_group"] if "m_per_group" in t else t["m"]
        parts.append(pd.DataFrame({"source": TABLES[name].upstream_repository, "table": name, "groups": groups,
                                   "m": m, "n": t["n"], "k": t["k"], "tflops": t["computation_tflops"],
                                   "gbps": t["memory_bandwidth_gbps"], **{c: t[c] for c in PROVENANCE}}))
    rows = pd.concat(parts, ignore_index=True)
    rows["used_in_fit"] = rows["m"] >= 128
    return rows


def gemm_flops_bytes(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs, bytes) of each GEMM row as DeepGEMM counts them. -> [R], [R]"""
    g, m, n, k = (rows[c].to_numpy(float) for c in ("groups", "m", "n", "k"))
    return 2 * g * m * n * k, g * (m * k + n * k + 2 * m * n)


# ---- communication workloads -------------------------------------------------------------------------------


def route(num_ranks: int, tokens: int, topk_groups: int | None, seed: int, experts: int = EXPERTS) -> np.ndarray:
    """Uniform random top-8 of `experts` experts for `tokens` tokens on each of num_ranks ranks; with topk_groups,
    groups = nodes (256 / nodes experts each) and only the topk_groups groups with the largest max score
    compete (DeepEP's tests). -> [num_ranks * tokens, 8] expert ids; token j lives on rank j % num_ranks."""
    rng = np.random.default_rng(seed)
    total, chunk = num_ranks * tokens, max(1, 2 ** 22 // experts)  # the same draws as one matrix, in slices
    return np.concatenate([top_k(rng.random((min(chunk, total - start), experts)), num_ranks, topk_groups)
                           for start in range(0, total, chunk)])


def top_k(scores: np.ndarray, num_ranks: int, topk_groups: int | None) -> np.ndarray:
    """The TOP_K experts of each token's scores (in no particular order), within its topk_groups best node
    groups when given. scores [B, E] -> [B, TOP_K]"""
    if topk_groups is not None:
        nodes = num_ranks // GPUS_PER_NODE
        group_max = scores.reshape(len(scores), nodes, -1).max(-1)
        keep = np.argsort(-group_max, axis=1)[:, :topk_groups]
        allowed = np.zeros((len(scores), nodes), bool)
        np.put_along_axis(allowed, keep, True, axis=1)
        scores = np.where(np.repeat(allowed, scores.shape[1] // nodes, axis=1), scores, -1.0)
    return np.argpartition(-scores, TOP_K - 1, axis=1)[:, :TOP_K]


@dataclass(frozen=True)
class CommBench:
    """One DeepEP row's workload and its phase copies [G, G] (precomputed: they do not depend on constants)."""

    table: str
    ep: int
    tokens: int
    dataflow: str  # dispatch_combine | hierarchical | low_latency
    out_parts: tuple[np.ndarray, ...]  # scatter copy matrices (hierarchical: inter, intra)
    counted: float  # the benchmark's count per rank: received pairs, (token, node) pairs, or token-expert pairs


def bench_experts(table: str, ep: int) -> int:
    """Experts of the benchmark at this EP size. DeepEP's low-latency test runs 288 (where EP divides it: 8,
    16, 32); at EP 64-256, where 288 does not divide, the published setup names none and 256 (V3's) is used.
    Hybrid-EP states "Local Experts: 8" (8 per rank); DeepEP V2 states V3's configuration (256)."""
    if table == "deepep_low_latency" and LL_TEST_EXPERTS % ep == 0:
        return LL_TEST_EXPERTS
    return 8 * ep if table.startswith("hybrid_ep") else EXPERTS


BENCH_TOKENS = {"deepep_low_latency": 128, "deepep_normal": 4096, "deepep_v2": 8192, "hybrid_ep_h100": 4096,
                "hybrid_ep_b200": 4096}  # tokens per rank, as each source states its setup


def comm_bench(table: str, ep: int, seed: int = 0, experts: int | None = None) -> CommBench:
    """The workload behind one EP size of a communication table (experts: bench_experts). Only DeepEP V1's
    normal test limits each token to its top min(nodes, 4) node groups; the others route uniformly."""
    low_latency = table == "deepep_low_latency"
    experts = bench_experts(table, ep) if experts is None else experts
    tokens = BENCH_TOKENS[table]
    nodes = ep // GPUS_PER_NODE
    ids = route(ep, tokens, min(nodes, 4) if table == "deepep_normal" and nodes > 1 else None, seed, experts)
    src = np.arange(len(ids)) % ep
    dest = ids // (experts // ep)  # [T, k] GPU of each pair (EP-wise contiguous)
    on = np.zeros((len(ids), ep), bool)
    on[np.arange(len(ids))[:, None], dest] = True
    if low_latency:
        return CommBench(table, ep, tokens, "low_latency", (pair_copy_matrix(src, dest, ep),), TOP_K * tokens)
    if nodes == 1:  # intranode: tokens each rank receives, its own included
        return CommBench(table, ep, tokens, "dispatch_combine", (copy_matrix(src, on),), on.sum() / ep)
    cost = Links(1, 1, 0, 0, 0).cost(ep)
    inter, intra = relay_copies(src, on, cost)
    node_pairs = np.zeros((len(ids), nodes), bool)
    node_pairs[np.arange(len(ids))[:, None], dest // GPUS_PER_NODE] = True
    return CommBench(table, ep, tokens, "hierarchical", (inter, intra), node_pairs.sum() / ep)


def comm_seconds(bench: CommBench, cost: CostModel) -> tuple[float, float]:
    """(dispatch, combine) seconds of the bench's layer, as simulator.layer_step times its phases."""
    out_bytes, back_bytes = cost.phase_bytes
    if bench.dataflow == "hierarchical":
        inter, intra = bench.out_parts
        return (phases(a2a_time(inter, cost, out_bytes), a2a_time(intra, cost, out_bytes), cost),
                phases(a2a_time(intra.T, cost, back_bytes), a2a_time(inter.T, cost, back_bytes), cost))
    (out,) = bench.out_parts
    return a2a_time(out, cost, out_bytes), a2a_time(out.T, cost, back_bytes)


@lru_cache(maxsize=None)
def comm_benches(seed: int = 0) -> tuple[CommBench, ...]:
    """Every DeepEP EP size of both tables."""
    normal = sorted(set(load_table("deepep_normal")["num_ep"]))
    low = sorted(load_table("deepep_low_latency")["num_ep"])
    return tuple([comm_bench("deepep_normal", ep, seed) for ep in normal]
                 + [comm_bench("deepep_low_latency", ep, seed) for ep in low])


def comm_rows() -> pd.DataFrame:
    """Every DeepEP number: source, table, kind, ep, tokens, unit, published, used_in_fit (one per number)."""
    rows = []
    for r in load_table("deepep_normal").itertuples():
        rows.append({"table": "deepep_normal", "kind": f"{r.operation}_bandwidth", "ep": r.num_ep, "tokens": 4096,
                     "unit": "GB/s", "published": float(r.bottleneck_bandwidth_gbps),
                     **{c: getattr(r, c) for c in PROVENANCE}})
    for r in load_table("deepep_low_latency").itertuples():
        for op in ("dispatch", "combine"):
            for what, unit, column in (("latency", "us", f"{op}_latency_us"),
                                       ("bandwidth", "GB/s", f"{op}_rdma_bandwidth_gbps")):
                rows.append({"table": "deepep_low_latency", "kind": f"{op}_{what}", "ep": r.num_ep, "tokens": 128,
                             "unit": unit, "published": float(getattr(r, column)),
                             **{c: getattr(r, c) for c in PROVENANCE}})
    out = pd.DataFrame(rows)
    out.insert(0, "source", TABLES["deepep_normal"].upstream_repository)
    out["used_in_fit"] = out["ep"] <= 32
    out["split"] = np.where(out["used_in_fit"], "fit",
                            np.where(out["kernel"] == OLDER_KERNEL, "older_kernel", "validation"))
    return out


def simulate_comm(rows: pd.DataFrame, links: Links, benches: Sequence[CommBench]) -> np.ndarray:
    """The simulated value of every comm row (rows as comm_rows()). -> [R]"""
    by_key = {(b.table, b.ep): b for b in benches}
    times = {}
    for key, bench in by_key.items():
        times[key] = comm_seconds(bench, links.cost(bench.ep))
    out = np.empty(len(rows))
    for i, r in enumerate(rows.itertuples()):
        bench = by_key[(r.table, r.ep)]
        op, what = r.kind.split("_")
        seconds = times[(r.table, r.ep)][0 if op == "dispatch" else 1]
        if what == "latency":
            out[i] = seconds * 1e6
            continue
        per_count = (LL_DISPATCH_BYTES if r.table == "deepep_low_latency" else FP8_TOKEN_BYTES) \
            if op == "dispatch" else BF16_TOKEN_BYTES
        out[i] = bench.counted * per_count / seconds / GB
    return out


def simulate_gemm(rows: pd.DataFrame, gemm: Gemm) -> tuple[np.ndarray, np.ndarray]:
    """(TFLOPS, GB/s) of every GEMM row (rows as gemm_rows()). -> [R], [R]"""
    seconds = gemm_seconds(gemm, rows)
    flops, nbytes = gemm_flops_bytes(rows)
    return flops / seconds / 1e12, nbytes / seconds / GB


# ---- fitting -----------------------------------------------------------------------------------------------

GEMM_START = Gemm(10.0, 100.0, 3000.0, 3.0, 0.1, 2.0)
LINKS_START = Links(150.0, 45.0, 10.0, 30.0, 0.05)


def fit_positive(residuals, start: np.ndarray) -> np.ndarray:
    """Least squares over positive parameters (solved in log space so none goes negative). -> [P]"""
    result = least_squares(lambda z: residuals(np.exp(z)), np.log(start), x_scale=1.0)
    return np.exp(result.x)


def fit_gemm(rows: pd.DataFrame, published: np.ndarray, start: Gemm = GEMM_START) -> Gemm:
    """Gemm constants minimising the squared log ratio simulated / published TFLOPS over `rows`. published [R]"""
    def residuals(p: np.ndarray) -> np.ndarray:
        return np.log(simulate_gemm(rows, Gemm(*p))[0] / published)
    return Gemm(*map(float, fit_positive(residuals, np.array(list(asdict(start).values())))))


def fit_links(rows: pd.DataFrame, published: np.ndarray, benches: Sequence[CommBench],
              start: Links = LINKS_START, free: Sequence[str] | None = None) -> Links:
    """Links minimising the squared log ratio simulated / published over `rows` (comm_rows() rows) [R].
    Only the fields named in `free` (default: all) move from `start`; the others stay as given."""
    base = asdict(start)
    names = list(base) if free is None else list(free)
    assert set(names) <= set(base), names

    def links(p: np.ndarray) -> Links:
        return Links(**{**base, **dict(zip(names, map(float, p)))})

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.log(simulate_comm(rows, links(p), benches) / published)
    return links(fit_positive(residuals, np.array([base[n] for n in names])))


@dataclass(frozen=True)
class HardwareFit:
    """Fitted constants and the row table (ROW_COLUMNS)."""

    gemm: Gemm
    links: Links
    rows: pd.DataFrame

    def calibration(self) -> dict[str, object]:
        """The topology `calibration` block of the fitted constants."""
        return calibration_block(self.gemm, self.links, SMS["H800"])


def calibration_block(gemm: Gemm, links: Links, num_sms: int) -> dict[str, object]:
    """A topology `calibration` block (expert_model efficiency in its tile form, concurrent links, FP8 dispatch
    with 128-value scale blocks, BF16 combine), constants to 4 significant digits."""
    rounded = lambda d: {k: float(f"{v:.4g}") for k, v in d.items()}  # noqa: E731
    return {"expert_model": "efficiency", **rounded(asdict(gemm)), "gemm_num_sms": num_sms,
            "link_model": "concurrent", **rounded(asdict(links)), "scatter_bytes_per_value": 1,
            "scatter_scale_block": 128, "combine_bytes_per_value": 2}


def row_table(gemm: Gemm, links: Links, benches: Sequence[CommBench]) -> pd.DataFrame:
    """ROW_COLUMNS: every published number next to its simulation under (gemm, links)."""
    g = gemm_rows()
    tflops, gbps = simulate_gemm(g, gemm)
    gemm_part = []
    for kind, unit, col, sim in (("tflops", "TFLOPS", "tflops", tflops), ("memory_bandwidth", "GB/s", "gbps", gbps)):
        gemm_part.append(pd.DataFrame({"source": g["source"], "table": g["table"], "kind": kind, "ep": np.nan,
                                       "tokens": g["groups"] * g["m"], "m": g["m"], "n": g["n"], "k": g["k"],
                                       "unit": unit, "published": g[col].astype(float), "simulated": sim,
                                       "used_in_fit": g["used_in_fit"], **gemm_tiles(g),
                                       "split": np.where(g["used_in_fit"], "fit", "validation"),
                                       **{c: g[c] for c in PROVENANCE}}))
    c = comm_rows()
    c["simulated"] = simulate_comm(c, links, benches)
    rows = pd.concat([*gemm_part, c], ignore_index=True)
    rows["rel_error"] = rows["simulated"] / rows["published"] - 1
    rows["preset"] = "h800"
    return rows[ROW_COLUMNS]


def fit_published(seed: int = 0) -> HardwareFit:
    """Fit on the FIT_RULES rows of the published tables; the row table covers every published number."""
    benches = comm_benches(seed)
    g = gemm_rows()
    gfit = g[g["used_in_fit"]]
    gemm = fit_gemm(gfit, gfit["tflops"].to_numpy(float))
    c = comm_rows()
    cfit = c[c["used_in_fit"]]
    links = fit_links(cfit, cfit["published"].to_numpy(float), benches)
    return HardwareFit(gemm, links, row_table(gemm, links, benches))


def expert_count_effect(links: Links, seed: int = 0) -> pd.DataFrame:
    """The low-latency rows where DeepEP's test runs 288 experts (EP 8, 16, 32), simulated under `links` with
    288 and with 256 experts: columns ep, operation, seconds_288, seconds_256, rel_difference (256 vs 288)."""
    rows = []
    for ep in sorted(load_table("deepep_low_latency")["num_ep"]):
        if LL_TEST_EXPERTS % ep:
            continue
        times = {e: comm_seconds(comm_bench("deepep_low_latency", ep, seed, e), links.cost(ep))
                 for e in (LL_TEST_EXPERTS, EXPERTS)}
        for i, op in enumerate(("dispatch", "combine")):
            rows.append({"ep": ep, "operation": op, "seconds_288": times[LL_TEST_EXPERTS][i],
                         "seconds_256": times[EXPERTS][i],
                         "rel_difference": times[EXPERTS][i] / times[LL_TEST_EXPERTS][i] - 1})
    return pd.DataFrame(rows)


def write_fit(fit: HardwareFit, out: Path, command: str) -> list[Path]:
    """out/rows.csv, out/summary.csv and out/calibration.yaml (the `calibration` block, headed by `command`)."""
    from omegaconf import OmegaConf

    block = OmegaConf.to_yaml(OmegaConf.create({"calibration": fit.calibration()}))
    header = (f"# fitted by {command} on data/published/ (fit split: GEMMs {FIT_RULES['gemm']}; "
              f"communication {FIT_RULES['comm']})\n")
    return [write_atomic(out / "rows.csv", lambda tmp: fit.rows.to_csv(tmp, index=False)),
            write_atomic(out / "summary.csv", lambda tmp: error_summary(fit.rows).to_csv(tmp, index=False)),
            write_text_atomic(out / "calibration.yaml", header + block),
            write_atomic(out / "experts_288_vs_256.csv",
                         lambda tmp: expert_count_effect(fit.links).to_csv(tmp, index=False))]


def measurement(rows: pd.DataFrame) -> pd.Series:
    """One key per independent measurement: a GEMM's TFLOPS and GB/s are one timing, and so are a DeepEP
    operation's latency and bandwidth at one EP size, and Hybrid-EP's kernel-only and Torch API times of one
    run (rows as ROW_COLUMNS). -> [R]"""
    op = rows["kind"].str.split("_").str[0].where(rows["ep"].notna(), "gemm")
    columns = [rows[c] for c in ("table", "gpu", "kernel", "ep", "tokens", "m", "n", "k")] + [op]
    return pd.Series(["|".join(map(str, key)) for key in zip(*columns)], index=rows.index)


def error_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """By preset class, gpu, table and split: the count of numbers, of independent measurements, and the
    median and max |rel_error|."""
    rows = rows.assign(abs_error=rows["rel_error"].abs(), measurement=measurement(rows))
    grouped = rows.groupby(["preset", "gpu", "table", "split"])
    return pd.concat([grouped["abs_error"].count().rename("numbers"),
                      grouped["measurement"].nunique().rename("independent"),
                      grouped["abs_error"].median().rename("median"),
                      grouped["abs_error"].max().rename("max")], axis=1).reset_index()

