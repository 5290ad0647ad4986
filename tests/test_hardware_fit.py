"""The calibrated cost model: roofline numbers pinned by hand, the new link/dataflow terms on tiny cases,
the fit recovering constants it simulated, and the published tables reproduced on the stated split."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from moetuner import PROJECT_ROOT
from moetuner.costmodel.cost import CostModel, GemmCurve, SimulationError, a2a_time, cost_model
from moetuner.hardware.fit import (Gemm, Links, bench_experts, comm_bench, comm_rows, comm_seconds, fit_gemm, fit_links,
                                             fit_published, gemm_rows, route, simulate_comm, simulate_gemm)
from moetuner.costmodel.tiles import TILE_KEYS, TileGemm, block_shape, tile_count
from moetuner.hardware.classes import BORROWED, FREE, class_comm_rows
from moetuner.costmodel.simulator import layer_step
from moetuner.placement import contiguous_phy2log, expert_location
from moetuner.topology import topology_from_config, topology_preset


def test_roofline_preset_numbers_by_hand() -> None:
    """h200_2x8 without its calibration block, DeepSeek-V2-Lite expert (2048 x 1408): the roofline, unchanged."""
    cost = cost_model(topology_from_config({**topology_preset("h200_2x8"), "calibration": {}}), 2048, 1408)
    assert cost.per_token_s == 6.0 * 2048 * 1408 / 989e12
    assert cost.floor_s == 3.0 * 2048 * 1408 * 2 / 4800e9  # 3.6 us: the memory floor of the issue
    assert cost.floor_s == pytest.approx(3.604e-6, rel=1e-3)
    assert cost.fixed_s == 0.0 and cost.kernel_s == 0.0 and cost.gemm is None
    assert cost.token_bytes == 4096.0 and cost.phase_bytes == (4096.0, 4096.0)
    assert cost.link_model == "serial" and cost.message_s == 0.0
    # busy at 1 token: the floor; at 10000 tokens: compute-bound
    assert cost.expert_time(np.array([0, 1, 10000])).tolist() == [0.0, cost.floor_s, 10000 * cost.per_token_s]


def test_calibrated_linear_block_unchanged() -> None:
    cfg = {**topology_preset("h100_1x8"), "calibration": {"expert_fixed_s": 1e-5, "expert_per_token_s": 2e-8,
                                                           "intra_node_bw_GBps": 100}}
    cost = cost_model(topology_from_config(cfg), 2048, 1408)
    assert (cost.per_token_s, cost.floor_s, cost.fixed_s) == (2e-8, 0.0, 1e-5)
    assert cost.bandwidth[0, 1] == 100e9
    assert cost.expert_time(np.array([3]))[0] == pytest.approx(1e-5 + 6e-8)
    with pytest.raises(SimulationError, match="needs both"):
        cost_model(topology_from_config({**cfg, "calibration": {"expert_fixed_s": 1e-5}}), 2048, 1408)
    with pytest.raises(SimulationError, match="efficiency needs"):
        cost_model(topology_from_config({**cfg, "calibration": {"expert_model": "efficiency"}}), 2048, 1408)
    with pytest.raises(SimulationError, match="expert_model"):
        cost_model(topology_from_config({**cfg, "calibration": {"expert_model": "magic"}}), 2048, 1408)


def test_gemm_curve_by_hand() -> None:
    """q = 1 adds compute and memory time; a large q tends to their max."""
    m, n, k = 100, 200, 300
    flops, nbytes = 2 * m * n * k, m * k + n * k + 2 * m * n
    add = GemmCurve(1e12, 1e9, 1.0, 0.0)
    assert add.time(m, n, k) == pytest.approx(flops / 1e12 + nbytes / 1e9)
    near_max = GemmCurve(1e12, 1e9, 60.0, 0.0)
    assert near_max.time(m, n, k) == pytest.approx(max(flops / 1e12, nbytes / 1e9), rel=0.02)
    assert GemmCurve(1e12, 1e9, 1.0, 2e-9).kernel_s(k) == pytest.approx(6e-7)


def test_h800_preset_is_the_published_fit() -> None:
    """Every h800 preset carries the calibration block benchmarks/published_hardware.py wrote."""
    fitted = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "docs" / "results" / "published_hardware"
                                                   / "calibration.yaml"))["calibration"]
    for nodes in (1, 2, 4, 8, 18):
        topo = topology_from_config(topology_preset(f"h800_{nodes}x8"))
        assert topo.calibration == fitted and topo.num_gpus == 8 * nodes
        cost = cost_model(topo, 7168, 2048)
        assert cost.tiles is not None and cost.gemm is None and cost.gemms == ((4096, 7168), (7168, 2048))
        assert cost.tiles.num_sms == 132
        assert cost.phase_bytes == (7168 + 56 * 4, 2 * 7168)  # FP8 + float32 scale per 128, BF16
        assert cost.kernel_s == pytest.approx(2 * fitted["gemm_kernel_us"] * 1e-6)  # one kernel per GEMM
        # off the memory floor: 4096 tokens cost over 10x what 64 tokens do
        t = cost.expert_time(np.array([1, 64, 4096]))
        assert t[0] < t[1] < t[2] and t[2] / t[1] > 10


def two_gpu_cost(link_model: str, message_s: float = 0.0) -> CostModel:
    """3 GPUs: 0 and 1 on node 0 (100 B/s), 2 on node 1 (10 B/s), 100 bytes per copy, no latency."""
    node = np.array([0, 0, 1])
    same = node[:, None] == node[None, :]
    bw = np.where(same, 100.0, 10.0)
    np.fill_diagonal(bw, np.inf)
    lat = np.zeros((3, 3))
    return CostModel(0.0, 0.0, 0.0, 100.0, bw, lat, node, message_s=message_s, link_model=link_model)


def test_concurrent_links_and_message_cost_by_hand() -> None:
    """GPU 0 sends 1 copy to GPU 1 (same node, 100 B/s) and 1 to GPU 2 (other node, 10 B/s), 100 B each."""
    copies = np.array([[0, 1, 1], [0, 0, 0], [0, 0, 0]])
    assert a2a_time(copies, two_gpu_cost("serial")) == pytest.approx(1.0 + 10.0)
    assert a2a_time(copies, two_gpu_cost("concurrent")) == pytest.approx(10.0)
    assert a2a_time(copies, two_gpu_cost("concurrent", message_s=0.5)) == pytest.approx(10.0 + 2 * 0.5)
    assert a2a_time(copies, two_gpu_cost("serial"), token_bytes=50.0) == pytest.approx(5.5)


def test_low_latency_sends_every_pair() -> None:
    """Token 0 on GPU 0 with two experts on GPU 2 and one on GPU 0: dispatch_combine sends one copy to GPU 2,
    low_latency two (no dedup per GPU); neither sends to GPU 0 itself."""
    cost = two_gpu_cost("serial")
    slots = expert_location(np.arange(6)[None], 3, 6).layers()[0]  # 2 slots per GPU: experts 4, 5 on GPU 2
    slot = np.array([[4, 5, 0]])
    src = np.array([0])
    dc = layer_step(slot, src, src, slots, cost, "dispatch_combine")
    ll = layer_step(slot, src, src, slots, cost, "low_latency")
    assert dc.scatter_s == pytest.approx(100 / 10.0) and ll.scatter_s == pytest.approx(2 * 100 / 10.0)
    assert ll.combine_s == pytest.approx(2 * 100 / 10.0)
    assert ll.bytes_inter == 4 * 100 and dc.bytes_inter == 2 * 100 and ll.bytes_intra == 0


@pytest.mark.parametrize("table,ep", [("deepep_normal", 8), ("deepep_normal", 16), ("deepep_low_latency", 16)])
def test_comm_seconds_is_the_simulator(table: str, ep: int) -> None:
    """The fit's phase times are the simulator's layer_step on the same workload (contiguous EP layout)."""
    bench = comm_bench(table, ep, seed=3)
    links = Links(150.0, 40.0, 20.0, 30.0, 0.1)
    cost = links.cost(ep)
    experts = bench_experts(table, ep)
    assert experts == (288 if table == "deepep_low_latency" else 256)  # DeepEP's tests at EP 8 and 16
    ids = route(ep, bench.tokens, None if table == "deepep_low_latency" or ep == 8 else min(ep // 8, 4), seed=3,
                experts=experts)
    slots = expert_location(contiguous_phy2log(1, experts, ep, experts // ep), ep, experts).layers()[0]
    src = np.arange(len(ids)) % ep
    step = layer_step(slots.log2phy[ids, 0], src, src, slots, cost, bench.dataflow)
    assert comm_seconds(bench, cost) == pytest.approx((step.scatter_s, step.combine_s), rel=1e-12)


def test_route_group_limit() -> None:
    """EP64 (8 nodes, top-4 groups): every token's experts lie on at most 4 nodes; without a limit most
    tokens touch more."""
    limited = route_nodes(64, 4)
    assert limited.max() <= 4
    assert route_nodes(64, None).mean() > 5


def route_nodes(ep: int, groups: int | None) -> np.ndarray:
    ids = route(ep, 64, groups, seed=1)
    nodes = ids // (256 // (ep // 8))
    return np.array([len(set(row)) for row in nodes])


def test_fit_recovers_known_constants() -> None:
    """Numbers simulated with known constants on the benchmarks' own workloads are fitted back."""
    truth_gemm = Gemm(12.0, 150.0, 3300.0, 2.0, 1.5, 0.8)
    rows = gemm_rows()
    fitted = fit_gemm(rows, simulate_gemm(rows, truth_gemm)[0])
    assert np.allclose(list(asdict(fitted).values()), list(asdict(truth_gemm).values()), rtol=1e-3)
    truth_links = Links(140.0, 40.0, 15.0, 35.0, 0.2)
    benches = [comm_bench("deepep_normal", 8), comm_bench("deepep_normal", 16)] + \
        [comm_bench("deepep_low_latency", ep) for ep in (8, 16, 32, 64, 128)]
    crows = comm_rows()
    crows = crows[[(t, e) in {(b.table, b.ep) for b in benches} for t, e in zip(crows["table"], crows["ep"])]]
    crows = crows.reset_index(drop=True)
    fitted_links = fit_links(crows, simulate_comm(crows, truth_links, benches), benches)
    assert np.allclose(list(asdict(fitted_links).values()), list(asdict(truth_links).values()), rtol=1e-2)
    # a class fit moves only its free constants: the rest stay at the start values given
    start = Links(140.0, 60.0, 15.0, 20.0, 0.2)  # inter latency above intra: a phase pays the larger
    partial = fit_links(crows, simulate_comm(crows, truth_links, benches), benches, start,
                        free=("inter_node_bw_GBps", "inter_node_latency_us"))
    assert (partial.intra_node_bw_GBps, partial.intra_node_latency_us, partial.message_us) == (140.0, 15.0, 0.2)
    assert (partial.inter_node_bw_GBps, partial.inter_node_latency_us) == pytest.approx((40.0, 35.0), rel=1e-2)


@pytest.fixture(scope="module")
def published_fit():
    return fit_published()


@pytest.mark.slow
def test_published_numbers_reproduced(published_fit) -> None:
    """The aims of the calibration: fit rows within 15%, validation rows within 25% (at least four), the
    DeepGEMM dense shapes that are no expert GEMM (attention and dense projections) included."""
    rows: pd.DataFrame = published_fit.rows
    assert len(rows) == 2 * 28 + 8 + 24  # every published number: TFLOPS and GB/s per GEMM row, DeepEP cells
    fit, check = rows[rows["used_in_fit"]], rows[rows["split"] == "validation"]
    non_expert = ~check[["n", "k"]].apply(tuple, axis=1).isin([(4096, 7168), (7168, 2048)]) & check["n"].notna()
    assert non_expert.sum() == 2 * 4  # the four non-expert shapes at M = 64, TFLOPS and GB/s
    assert set(rows.loc[rows["split"] == "older_kernel", "ep"]) == {128, 256}  # DeepEP's first LL kernel
    assert fit["rel_error"].abs().max() < 0.15
    assert len(check) >= 4 and check["rel_error"].abs().max() < 0.25
    assert set(check["table"]) == {"deepgemm_dense", "deepep_normal", "deepep_low_latency"}
    shipped = pd.read_csv(PROJECT_ROOT / "docs" / "results" / "published_hardware" / "rows.csv")
    assert np.allclose(shipped.loc[shipped["preset"] == "h800", "simulated"], rows["simulated"], rtol=1e-6)


def test_block_shapes_tiles_and_waves_by_hand() -> None:
    """DeepGEMM's choice on 132 SMs. M = 64, N = 2112: BLOCK_N = 16 makes 2112 / 16 = 132 tiles, one full
    wave (every larger BLOCK_N also makes one wave, but a less full one). M = N = 4096: BLOCK_N = 128 gives
    32 x 32 = 1024 tiles = 8 waves (7 full + 100); any narrower block needs 9 or more."""
    assert block_shape(64, 2112, 1, 132, "dense") == (64, 16)
    assert tile_count(64, 2112, 1, (64, 16), "dense") == 132
    assert block_shape(4096, 4096, 1, 132, "dense") == (128, 128)
    assert tile_count(4096, 4096, 1, (128, 128), "dense") == 1024
    # masked: 4 groups of 256 rows, N = 7168: BLOCK_N 112 -> 4 * 2 * 64 = 512 tiles = 4 waves (last 116),
    # BLOCK_N 128 -> 4 * 2 * 56 = 448 tiles = 4 waves (last 52): the fuller last wave wins
    assert block_shape(256, 7168, 4, 132, "masked") == (128, 112)
    assert tile_count(256, 7168, 4, (128, 112), "masked") == 512
    # contiguous: one GEMM over groups * m rows, BLOCK_M 128 even for small groups
    assert block_shape(64, 4096, 4, 132, "contiguous")[0] == 128
    assert tile_count(64, 4096, 4, (128, 128), "contiguous") == 2 * 32
    # 148 SMs (B200): 4096 x 4096 in 128-blocks is 1024 tiles = 7 waves (6 full + 136)
    assert block_shape(4096, 4096, 1, 148, "dense") == (128, 128)


def test_tile_times_by_hand() -> None:
    """q = 1 adds compute and load time; one tile on 2 SMs; kernel and slot times from the same tile."""
    tg = TileGemm(sm_flops=1e12, sm_load_bw=1e9, mem_bw=1e10, overlap_q=1.0, tile_s=1e-6, kernel_s=5e-6,
                  num_sms=2)
    tile = 2 * 64 * 128 * 256 / 1e12 + (64 * 256 + 128 * 256 + 2 * 64 * 128) / 1e9 + 1e-6
    assert tg.tile_time(64, 128, 256) == pytest.approx(tile)
    # 10 tokens of an expert with N = 256: ceil(10/64) * ceil(256/128) = 2 tiles on 2 SMs, plus HBM bytes
    nbytes = 10 * 256 + 256 * 256 + 2 * 10 * 256
    assert tg.slot_time(np.array([0, 10]), 256, 256).tolist() == pytest.approx([0.0, 2 * tile / 2 + nbytes / 1e10])
    # a kernel of M = 64, N = 256: BLOCK_N 128 (2 tiles, one wave on 2 SMs) beats narrower blocks on fullness
    assert block_shape(64, 256, 1, 2, "dense") == (64, 128)
    assert tg.kernel_time(64, 256, 256, 1, "dense") == pytest.approx(tile + (64 * 256 + 256 * 256 + 2 * 64 * 256) / 1e10
                                                                     + 5e-6)


def test_tile_calibration_block() -> None:
    """A calibration block in the tile form builds a TileGemm; a missing key is named."""
    cal = {"expert_model": "efficiency", "gemm_sm_tflops": 10.0, "gemm_sm_load_GBps": 100.0,
           "gemm_mem_bw_GBps": 3000.0, "gemm_overlap_q": 2.0, "gemm_tile_us": 1.0, "gemm_kernel_us": 0.5,
           "gemm_num_sms": 132}
    cost = cost_model(topology_from_config({**topology_preset("h100_1x8"), "calibration": cal}), 2048, 1408)
    assert cost.tiles is not None and cost.tiles.num_sms == 132 and cost.kernel_s == pytest.approx(1e-6)
    assert cost.per_token_s == pytest.approx(2 * (2816 * 2048 + 2048 * 1408) / (10e12 * 132))
    one = cost.expert_time(np.array([1]))[0]
    assert one == pytest.approx(sum(cost.tiles.slot_time(np.array([1]), n, k)[0] for n, k in cost.gemms))
    assert cost.expert_time(np.array([64]))[0] < 1.5 * one  # 1 and 64 tokens fill the same tiles
    bad = {k: v for k, v in cal.items() if k != "gemm_num_sms"}
    with pytest.raises(SimulationError, match="gemm_num_sms"):
        cost_model(topology_from_config({**topology_preset("h100_1x8"), "calibration": bad}), 2048, 1408)


CLASS_PRESETS = {"h100": ("h100_1x8", "h100_4x8", "h100_8x8"), "h200": ("h200_2x8",), "b200": ("b200_1x8", "b200_2x8")}


@pytest.mark.parametrize("name", sorted(CLASS_PRESETS))
def test_class_presets_carry_their_fit(name: str) -> None:
    """Every h100/h200/b200 preset carries the block benchmarks/published_hardware.py wrote for its class, and
    every constant of that block is either fitted on the class's own rows or names where it is borrowed from."""
    fitted = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "docs" / "results" / "published_hardware"
                                                   / f"calibration_{name}.yaml"))["calibration"]
    for preset in CLASS_PRESETS[name]:
        topo = topology_from_config(topology_preset(preset))
        assert topo.calibration == fitted
        assert cost_model(topo, 2048, 1408).tiles.num_sms == (148 if name == "b200" else 132)
    constants = set(TILE_KEYS) - {"gemm_num_sms"} | {"intra_node_bw_GBps", "inter_node_bw_GBps",
                                                     "intra_node_latency_us", "inter_node_latency_us", "message_us"}
    own = set() if name == "h200" else set(FREE[name])
    assert own | set(BORROWED[name]) == constants and not own & set(BORROWED[name])


@pytest.mark.parametrize("name", ["h100", "h200"])
def test_h100_class_borrows_h800_inter_node_latency(name: str) -> None:
    """The h100 class (and h200 through it) fits only the inter-node bandwidth: its rows at 4096 and 8192
    tokens per rank cannot separate a per-phase latency from a bandwidth, so every latency in its block is
    the H800 link fit's, and the source of the inter-node latency says so."""
    results = PROJECT_ROOT / "docs" / "results" / "published_hardware"
    h800 = OmegaConf.to_container(OmegaConf.load(results / "calibration.yaml"))["calibration"]
    block = OmegaConf.to_container(OmegaConf.load(results / f"calibration_{name}.yaml"))["calibration"]
    assert FREE["h100"] == ("inter_node_bw_GBps",)
    for key in ("intra_node_latency_us", "inter_node_latency_us", "message_us"):
        assert block[key] == h800[key]
    assert "H800 link fit" in BORROWED[name]["inter_node_latency_us"]


def test_class_split_as_written() -> None:
    """The class rows and their split (moetuner.hardware.classes CLASS_RULES): H100 fits Hybrid-EP's 16-SM
    kernel rows at EP 16/32 and checks EP 64 and DeepEP V2 SM90; B200 fits DeepEP V2 SM100 and checks
    Hybrid-EP's B200 table; at least 4 independent validation values each."""
    rows = class_comm_rows()
    counts = rows.groupby(["preset", "table", "split"]).size().to_dict()
    assert counts == {("h100", "hybrid_ep_h100", "fit"): 4, ("h100", "hybrid_ep_h100", "validation"): 2,
                      ("h100", "deepep_v2", "validation"): 4, ("b200", "deepep_v2", "fit"): 4,
                      ("b200", "hybrid_ep_b200", "validation"): 6}
    assert set(rows.loc[rows["table"] == "deepep_v2", "gpu"]) == {"SM90", "SM100"}
    assert (rows.loc[rows["preset"] == "b200", "ep"].isin([8, 16])).all()
