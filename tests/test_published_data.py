"""The published DeepEP/DeepGEMM tables in data/published/: every CSV row against the verbatim source
excerpt it was transcribed from, a few rows hard-coded from reading the source, and the provenance."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from moetuner.published import (PUBLISHED_DIR, SOURCE_DIR, TABLES, load_table, parse_markdown_tables,
                                quantity, table_from_source)

ROW_COUNTS = {"deepep_normal": 8, "deepep_low_latency": 6, "deepgemm_dense": 18,
              "deepgemm_grouped_contiguous": 4, "deepgemm_grouped_masked": 6, "deepep_v2": 5, "hybrid_ep_h100": 9,
              "hybrid_ep_b200": 10}


def test_every_table_is_listed() -> None:
    assert set(TABLES) == set(ROW_COUNTS)
    assert {p.stem for p in PUBLISHED_DIR.glob("*.csv")} == set(TABLES)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_csv_matches_source_excerpt(name: str) -> None:
    shipped = load_table(name)
    assert len(shipped) == ROW_COUNTS[name]
    pd.testing.assert_frame_equal(shipped, table_from_source(name), check_dtype=False)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_provenance(name: str) -> None:
    source = TABLES[name]
    assert re.fullmatch(r"[0-9a-f]{40}", source.commit)
    shipped = load_table(name)
    for column, value in [("repository", source.repository), ("path", source.path),
                          ("commit", source.commit), ("table", source.heading)]:
        assert (shipped[column] == value).all(), column
    # the excerpt's own header names the same origin, and the README names the commit
    header = (SOURCE_DIR / source.excerpt).read_text().split("-->")[0]
    assert f"repository: {source.repository}" in header
    assert f"path: {source.path}\n" in header and f"commit: {source.commit}\n" in header
    assert source.commit in (PUBLISHED_DIR / "README.md").read_text()


def test_measured_by_kernel_version() -> None:
    """Each row names the upstream commit that first published its numbers (read from DeepEP's and
    DeepGEMM's README history): low-latency EP 8-64 re-measured at de8cfca, EP 128/256 still the first
    release; normal internode rows re-measured at 3b1045d; DeepGEMM's tables from its first commit."""
    ll = load_table("deepep_low_latency").set_index("num_ep")["measured_commit"].str[:7].to_dict()
    assert ll == {8: "de8cfca", 16: "de8cfca", 32: "de8cfca", 64: "de8cfca", 128: "ebfe47e", 256: "ebfe47e"}
    normal = load_table("deepep_normal").groupby("num_ep")["measured_commit"].agg(set).to_dict()
    assert {ep: {c[:7] for c in v} for ep, v in normal.items()} == \
        {8: {"ebfe47e"}, 16: {"3b1045d"}, 32: {"3b1045d"}, 64: {"3b1045d"}}
    for name in TABLES:
        table = load_table(name)
        assert table["measured_commit"].str.fullmatch(r"[0-9a-f]{40}").all()
        assert (table["gpu"] == "H800").all() == (name.startswith("deepep_") and name != "deepep_v2"
                                                  or name.startswith("deepgemm"))
        if name.startswith("deepgemm"):
            assert (table["measured_commit"].str[:7] == "a6d97a1").all()
            assert TABLES[name].commit.startswith("78cacf7") and TABLES[name].repository == "deepseek-ai/DeepGEMM"


def _row(name: str, **match: object) -> pd.Series:
    table = load_table(name)
    found = table[(table[list(match)] == pd.Series(match)).all(axis=1)]
    assert len(found) == 1, match
    return found.iloc[0]


def test_hand_picked_deepep_rows() -> None:
    row = _row("deepep_normal", type="Intranode", operation="dispatch", num_ep=8)
    assert (row.bottleneck_bandwidth, row.bottleneck_bandwidth_gbps, row.bandwidth_kind) == \
        ("153 GB/s (NVLink)", 153, "NVLink")
    assert _row("deepep_normal", operation="combine", num_ep=8).bottleneck_bandwidth_gbps == 158
    row = _row("deepep_normal", type="Internode", operation="combine", num_ep=64)
    assert (row.bottleneck_bandwidth_gbps, row.bandwidth_kind) == (50, "RDMA")
    assert _row("deepep_normal", operation="dispatch", num_ep=32).bottleneck_bandwidth_gbps == 58

    row = _row("deepep_low_latency", num_ep=8)
    assert (row.dispatch_latency_us, row.dispatch_rdma_bandwidth_gbps) == (77, 98)
    assert (row.combine_latency_us, row.combine_rdma_bandwidth_gbps) == (114, 127)
    row = _row("deepep_low_latency", num_ep=256)
    assert (row.dispatch_latency, row.dispatch_rdma_bandwidth) == ("194 us", "39 GB/s")
    assert (row.combine_latency, row.combine_rdma_bandwidth) == ("360 us", "40 GB/s")


def test_hand_picked_new_gpu_rows() -> None:
    """DeepEP V2 (SM90/SM100 as the source names them) and Hybrid-EP's H100 and B200 tables, read by eye."""
    row = _row("deepep_v2", gpu="SM90", topology="EP 8 x 2")
    assert (row.num_ep, row.dispatch_bandwidth_gbps, row.combine_bandwidth_gbps, row.num_sms) == (16, 90, 81, 12)
    assert row.measured_commit.startswith("b306af0") and row.kernel == "DeepEP V2"
    row = _row("deepep_v2", gpu="SM100", num_sms=64)
    assert (row.num_ep, row.dispatch_bandwidth, row.combine_bandwidth, row.sms_note) == \
        (8, "726 GB/s (NVLink)", "740 GB/s (NVLink)", "64 (Max perf)")
    row = _row("hybrid_ep_h100", num_ep=32, num_sms=8)  # a rank count printed once, filled down
    assert (row.torch_dispatch_fp8_gbps, row.kernel_combine_gbps, row.gpu) == (41.23, 56.40, "H100")
    row = _row("hybrid_ep_h100", num_ep=64, num_sms=16)
    assert (row.kernel_dispatch_fp8_gbps, row.kernel_dispatch_bf16_gbps) == (46.52, 49.97)
    row = _row("hybrid_ep_b200", implementation="DeepEP", num_sms=48)
    assert (row.dispatch_fp8_gbps, row.combine_gbps, row.measurement, row.gpu) == (554, 586, "Torch API", "B200")
    row = _row("hybrid_ep_b200", measurement="Only Kernel Time")  # bold in the source
    assert (row.implementation, row.num_sms, row.dispatch_fp8_gbps, row.combine_gbps) == ("HybridEP", 16, 599.27,
                                                                                          673.84)
    assert row.kernel == "Hybrid-EP" and row.measured_commit.startswith("7febc6e")


def test_hand_picked_deepgemm_rows() -> None:
    row = _row("deepgemm_dense", m=4096, n=7168, k=16384)
    assert (row.computation, row.memory_bandwidth, row.speedup) == ("1358 TFLOPS", "343 GB/s", "1.2x")
    row = _row("deepgemm_dense", m=64, n=2112, k=7168)
    assert (row.computation_tflops, row.memory_bandwidth_gbps, row.speedup_x) == (206, 1688, 2.7)
    row = _row("deepgemm_grouped_contiguous", num_groups=4, m_per_group=8192, n=4096, k=7168)
    assert (row.computation_tflops, row.memory_bandwidth_gbps, row.speedup_x) == (1297, 418, 1.2)
    row = _row("deepgemm_grouped_masked", num_groups=4, m_per_group=256, n=7168, k=2048)
    assert (row.computation_tflops, row.memory_bandwidth_gbps, row.speedup_x) == (815, 2047, 1.2)


def test_setups_as_the_source_states_them() -> None:
    deepep = (SOURCE_DIR / TABLES["deepep_normal"].excerpt).read_text()
    assert "(4096 tokens per batch, 7168 hidden, top-4 groups, top-8 experts, FP8 dispatching and BF16 " \
           "combining)" in deepep
    assert "(128 tokens per batch, 7168 hidden, top-8 experts, FP8 dispatching and BF16 combining)" in deepep
    assert "H800 (~160 GB/s NVLink maximum bandwidth)" in deepep
    v2 = (SOURCE_DIR / TABLES["deepep_v2"].excerpt).read_text()
    assert "8K tokens per batch, 7168 hidden dimensions, top 8 experts, FP8 dispatching, and BF16 combining" in v2
    assert "the results are logical bandwidth" in v2
    hybrid = (SOURCE_DIR / TABLES["hybrid_ep_h100"].excerpt).read_text()
    for line in ("- Device: H100", "- Device: B200", "- Tokens: 4096", "- Hidden Dimension: 7168", "- TopK: 8",
                 "- Router: Random Uniform", "- Local Experts: 8"):
        assert line in hybrid, line
    deepgemm = (SOURCE_DIR / TABLES["deepgemm_dense"].excerpt).read_text()
    assert "on H800 SXM5 with NVCC 12.8" in deepgemm and "based on CUTLASS 3.6" in deepgemm


def test_parse_markdown_tables() -> None:
    text = "# A\n\n| x | y |\n|:-:|--:|\n| 1 | 2 GB/s |\n\ntext\n## B\n| z |\n|---|\n| 3 |\n"
    first, second = parse_markdown_tables(text)
    assert (first.heading, first.header, first.rows) == ("A", ("x", "y"), (("1", "2 GB/s"),))
    assert (second.heading, second.header, second.rows) == ("B", ("z",), (("3",),))
    assert quantity("153 GB/s (NVLink)", "GB/s") == 153 and quantity("2.7x", "x") == 2.7
    with pytest.raises(ValueError):
        quantity("77 us", "GB/s")
