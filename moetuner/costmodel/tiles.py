"""GEMM time from output tiles and the waves they make on the GPU's SMs (the `efficiency` expert model's
tile form; docs/hardware.md).

A GEMM [M, K] x [K, N] is cut into output tiles of BLOCK_M x BLOCK_N; each SM computes one tile at a time,
so a kernel of T tiles runs ceil(T / num_sms) waves. One tile costs the smooth roofline of its own work on
one SM, ((2 * bm * bn * K / sm_flops)^q + (tile bytes / sm_load_bw)^q)^(1/q), plus a fixed tile_s
(pipeline fill and epilogue); tile bytes = bm*K*act + bn*K*weight + bm*bn*out. The kernel's time is the
smooth roofline of its waves and of its HBM traffic (bytes / mem_bw, every operand read once), plus
kernel_s. So a handful of tokens per expert still costs whole tiles, and a GEMM with fewer tiles than SMs
leaves SMs idle.

Block shapes follow DeepGEMM's choice (`deep_gemm/jit_kernels/gemm.py: get_best_configs`, deepseek-ai/
DeepGEMM commit 78cacf7): BLOCK_M = 64 if M <= 64 else 128 (always 128 in the contiguous layout), BLOCK_N in
16, 24, ..., 128 with the fewest waves, then the fullest last wave, then the larger BLOCK_N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetuner.topology import GB

LAYOUTS = ("dense", "contiguous", "masked")
BLOCK_NS = tuple(range(16, 129, 8))
CONTIGUOUS_BLOCK_M = 128  # deep_gemm get_m_alignment_for_contiguous_layout()
SLOT_BLOCK_N = 128  # an expert slot inside a many-tile grouped kernel: full-width blocks
TILE_KEYS = ("gemm_sm_tflops", "gemm_sm_load_GBps", "gemm_mem_bw_GBps", "gemm_overlap_q", "gemm_tile_us",
             "gemm_kernel_us", "gemm_num_sms")


def cdiv(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray | int:
    """Ceiling division of non-negative integers (elementwise)."""
    return -(-a // b)


def block_shape(m: int, n: int, groups: int, num_sms: int, layout: str) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) DeepGEMM picks for `groups` GEMMs of M = m rows each (contiguous: m is the rows of
    one group, the kernel sees groups * m rows in one GEMM)."""
    assert layout in LAYOUTS, layout
    assert m > 0 and n > 0 and groups > 0 and num_sms > 0
    if layout == "contiguous":
        bm, rows, kernels = CONTIGUOUS_BLOCK_M, m * groups, 1
    else:
        bm, rows, kernels = (64 if m <= 64 else 128), m, groups
    best: tuple[tuple[int, int, int], int] | None = None
    for bn in BLOCK_NS:
        tiles = cdiv(rows, bm) * cdiv(n, bn) * kernels
        last = tiles % num_sms or num_sms
        key = (cdiv(tiles, num_sms), -last, -bn)
        if best is None or key < best[0]:
            best = (key, bn)
    assert best is not None
    return bm, best[1]


def tile_count(m: int, n: int, groups: int, block: tuple[int, int], layout: str) -> int:
    """Output tiles of the kernel: groups * ceil(m / BLOCK_M) * ceil(n / BLOCK_N) (contiguous: of groups * m)."""
    bm, bn = block
    if layout == "contiguous":
        return int(cdiv(m * groups, bm) * cdiv(n, bn))
    return int(groups * cdiv(m, bm) * cdiv(n, bn))


@dataclass(frozen=True)
class TileGemm:
    """Fitted per-SM rates of an FP8 GEMM kernel (see the module docstring); seconds, bytes, FLOP/s."""

    sm_flops: float  # FLOP/s of one SM
    sm_load_bw: float  # B/s at which one SM streams its tile's operands
    mem_bw: float  # B/s of HBM for the whole kernel
    overlap_q: float
    tile_s: float  # fixed seconds per tile
    kernel_s: float  # fixed seconds per kernel
    num_sms: int
    act_bytes: float = 1.0  # FP8 activations
    weight_bytes: float = 1.0  # FP8 weights
    out_bytes: float = 2.0  # BF16 output

    def smooth(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(a^q + b^q)^(1/q): q = 1 adds, q -> inf takes the max."""
        q = self.overlap_q
        return (np.asarray(a, float) ** q + np.asarray(b, float) ** q) ** (1.0 / q)

    def tile_time(self, bm: np.ndarray, bn: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Seconds one SM spends on one bm x bn output tile of depth k. [...] -> [...]"""
        flops = 2.0 * bm * bn * k
        nbytes = bm * k * self.act_bytes + bn * k * self.weight_bytes + bm * bn * self.out_bytes
        return self.smooth(flops / self.sm_flops, nbytes / self.sm_load_bw) + self.tile_s

    def gemm_bytes(self, m: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
        """HBM bytes of one GEMM, each operand read once and the output written once. [...] -> [...]"""
        return m * k * self.act_bytes + n * k * self.weight_bytes + m * n * self.out_bytes

    def kernel_time(self, m: int, n: int, k: int, groups: int, layout: str) -> float:
        """Seconds of one kernel of `groups` GEMMs of m x n x k (DeepGEMM's block shapes), kernel_s included."""
        block = block_shape(m, n, groups, self.num_sms, layout)
        waves = cdiv(tile_count(m, n, groups, block, layout), self.num_sms)
        body = self.smooth(waves * self.tile_time(*block, k), groups * self.gemm_bytes(m, n, k) / self.mem_bw)
        return float(body) + self.kernel_s

    def slot_time(self, tokens: np.ndarray, n: int, k: int) -> np.ndarray:
        """Seconds one expert slot of `tokens` rows adds to a grouped kernel of many experts: its tiles'
        share of the SMs (tiles x tile time / num_sms; BLOCK_M 64 up to 64 rows, else 128; BLOCK_N 128)
        against its HBM bytes, 0 when idle. kernel_s is paid once per kernel, not here. [...] -> [...]"""
        tokens = np.asarray(tokens)
        bm = np.where(tokens <= 64, 64, 128)
        tiles = cdiv(tokens.astype(np.int64), bm) * cdiv(n, SLOT_BLOCK_N)
        busy = self.smooth(tiles * self.tile_time(bm, SLOT_BLOCK_N, k) / self.num_sms,
                           self.gemm_bytes(tokens, n, k) / self.mem_bw)
        return np.where(tokens > 0, busy, 0.0)


def tile_gemm(cal: dict) -> TileGemm:
    """The TileGemm of a calibration block (TILE_KEYS, optional gemm_*_bytes)."""
    return TileGemm(sm_flops=float(cal["gemm_sm_tflops"]) * 1e12, sm_load_bw=float(cal["gemm_sm_load_GBps"]) * GB,
                    mem_bw=float(cal["gemm_mem_bw_GBps"]) * GB, overlap_q=float(cal["gemm_overlap_q"]),
                    tile_s=float(cal["gemm_tile_us"]) * 1e-6, kernel_s=float(cal["gemm_kernel_us"]) * 1e-6,
                    num_sms=int(cal["gemm_num_sms"]), act_bytes=float(cal.get("gemm_act_bytes", 1.0)),
                    weight_bytes=float(cal.get("gemm_weight_bytes", 1.0)),
                    out_bytes=float(cal.get("gemm_out_bytes", 2.0)))
