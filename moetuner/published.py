"""Published kernel measurements shipped in ``data/published/``: DeepEP's V1 dispatch/combine tables and
DeepGEMM's FP8 GEMM tables, each transcribed from a verbatim excerpt of its source kept in
``data/published/source/`` (see ``data/published/README.md`` for setups, units and licences).

``load_table(name)`` reads a shipped CSV. ``table_from_source(name)`` rebuilds the same rows from the
excerpt's markdown table, which is how the CSVs were written (``write_tables()``) and how the tests
check them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moetuner import PROJECT_ROOT

PUBLISHED_DIR = PROJECT_ROOT / "data" / "published"
SOURCE_DIR = PUBLISHED_DIR / "source"


@dataclass(frozen=True)
class Source:
    """Where a table comes from: the stored copy it was read from, and the heading above it."""

    repository: str  # the repository whose stored copy was read
    upstream_repository: str  # the project that published the numbers
    path: str
    commit: str  # 40 hex digits
    excerpt: str  # file name under SOURCE_DIR
    heading: str  # the markdown heading right above the table
    gpu: str = "H800"  # the GPU the source names (rows may name their own: DeepEP V2's architecture column)


_DEEPEP = dict(repository="deepseek-ai/DeepEP", upstream_repository="deepseek-ai/DeepEP",
               path="docs/legacy.md", commit="3528514a6c3dac39e53d39cf67c7fffd49e23487",
               excerpt="deepseek-ai_DeepEP__docs-legacy.md__3528514a.md")
_DEEPEP_V2 = dict(repository="deepseek-ai/DeepEP", upstream_repository="deepseek-ai/DeepEP", path="README.md",
                  commit="af9a0403188392824fc3057452822235873e0612",
                  excerpt="deepseek-ai_DeepEP__README.md__af9a0403.md")
_HYBRID_EP = dict(repository="deepseek-ai/DeepEP", upstream_repository="deepseek-ai/DeepEP",
                  path="docs/README_Hybrid-EP.md", commit="17cfb817bccec3a9c247013360cc550c2bac441e",
                  excerpt="deepseek-ai_DeepEP__docs-README_Hybrid-EP.md__17cfb817.md")
_DEEPGEMM = dict(repository="deepseek-ai/DeepGEMM", upstream_repository="deepseek-ai/DeepGEMM",
                 path="README.md", commit="78cacf70d41d15d688bd493ebc85845f7f2a3d5d",
                 excerpt="deepseek-ai_DeepGEMM__README.md__78cacf70.md")

TABLES: dict[str, Source] = {
    "deepep_normal": Source(**_DEEPEP, heading="Normal kernels with NVLink and RDMA forwarding"),
    "deepep_low_latency": Source(**_DEEPEP, heading="Low-latency kernels with pure RDMA"),
    "deepgemm_dense": Source(**_DEEPGEMM, heading="Normal GEMMs for dense models"),
    "deepgemm_grouped_contiguous": Source(**_DEEPGEMM,
                                          heading="Grouped GEMMs for MoE models (contiguous layout)"),
    "deepgemm_grouped_masked": Source(**_DEEPGEMM, heading="Grouped GEMMs for MoE models (masked layout)"),
    "deepep_v2": Source(**_DEEPEP_V2, heading="Performance", gpu=""),
    "hybrid_ep_h100": Source(**_HYBRID_EP, heading="H100 Platform", gpu="H100"),
    "hybrid_ep_b200": Source(**_HYBRID_EP, heading="B200 Platform", gpu="B200"),
}


@dataclass(frozen=True)
class Kernel:
    """The upstream commit that first published a row's numbers (the kernel version that measured it)."""

    commit: str  # 40 hex digits, in the upstream repository
    date: str  # of that commit, YYYY-MM-DD
    label: str  # short name of the kernel version


_DEEPEP_V1 = Kernel("ebfe47e46fa86a5b41be96c326a92f62ed6721da", "2025-02-24", "DeepEP V1, first release")
_DEEPEP_INTERNODE = Kernel("3b1045db43ed232691d32dde0517dfed571b0a65", "2025-04-22",
                           "DeepEP V1, after the internode optimization")
_DEEPEP_LL = Kernel("de8cfca3cf86464c856f0e393f6a17359ff28c70", "2025-06-05", "DeepEP V1, low-latency update")
_DEEPEP_V2_KERNEL = Kernel("b306af06afd412c88e51e71802951606e40b7358", "2026-04-30", "DeepEP V2")
_HYBRID_EP_KERNEL = Kernel("7febc6e25660af0f54d95dd781ecdcd62265ecca", "2026-02-09", "Hybrid-EP")
_DEEPEP_IN_HYBRID = Kernel("7febc6e25660af0f54d95dd781ecdcd62265ecca", "2026-02-09",
                           "DeepEP (version not stated), in Hybrid-EP's comparison")
_DEEPGEMM_V1 = Kernel("a6d97a1c1b48a7a9d7994d0e155ee6f11d0a3f07", "2025-02-25", "DeepGEMM, first release")


def measured_by(name: str, row: dict[str, object]) -> Kernel:
    """The kernel version behind one CSV row of table ``name``, read from the upstream history of the file
    that holds the table (``git log -p``): DeepEP's README first published every row at ebfe47e; 3b1045d
    replaced the internode normal rows (EP 16/32/64; EP16 with the same 43/43 GB/s); de8cfca replaced the
    low-latency rows of EP 8-64 only, so EP 128/256 are still the first release's kernel. DeepGEMM's tables
    are unchanged from its first commit a6d97a1 to 78cacf7 (55ab91f later raised the M = 4096 and
    contiguous rows: a newer kernel, not these rows). DeepEP V2's table first appeared at b306af0 (EPv2
    release), Hybrid-EP's tables at 7febc6e, both unchanged since (``git log -S`` on their numbers)."""
    if name.startswith("deepgemm"):
        return _DEEPGEMM_V1
    if name == "deepep_normal":
        return _DEEPEP_V1 if row["num_ep"] == 8 else _DEEPEP_INTERNODE
    if name == "deepep_low_latency":
        return _DEEPEP_LL if int(row["num_ep"]) <= 64 else _DEEPEP_V1
    if name == "deepep_v2":
        return _DEEPEP_V2_KERNEL
    if name == "hybrid_ep_h100":
        return _HYBRID_EP_KERNEL
    if name == "hybrid_ep_b200":
        return _HYBRID_EP_KERNEL if row["implementation"] == "HybridEP" else _DEEPEP_IN_HYBRID
    raise KeyError(name)


@dataclass(frozen=True)
class MarkdownTable:
    """One pipe table: the nearest heading above it, its header cells and its body rows (stripped)."""

    heading: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def parse_markdown_tables(text: str) -> list[MarkdownTable]:
    """Every pipe table in ``text``, in order; the alignment row (``|:---:|``) is dropped."""
    tables: list[MarkdownTable] = []
    heading, block = "", []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            block.append(tuple(cell.strip() for cell in stripped[1:-1].split("|")))
            continue
        if block:
            body = tuple(row for row in block[1:] if not all(re.fullmatch(r":?-+:?", c) for c in row))
            tables.append(MarkdownTable(heading, block[0], body))
            block = []
        if stripped.startswith("#"):
            heading = stripped.lstrip("#").strip()
    return tables


def source_table(name: str) -> MarkdownTable:
    """The markdown table behind ``name``, parsed from its verbatim excerpt."""
    source = TABLES[name]
    found = [t for t in parse_markdown_tables((SOURCE_DIR / source.excerpt).read_text())
             if t.heading == source.heading]
    if len(found) != 1:
        raise ValueError(f"{source.excerpt}: expected one table under {source.heading!r}, found {len(found)}")
    return found[0]


def quantity(printed: str, unit: str) -> float:
    """The number in a printed cell such as ``153 GB/s (NVLink)``, ``77 us`` or ``2.7x``, after checking
    its unit."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(\S+)(?:\s+\((\w+)\))?", printed)
    if match is None or match.group(2) != unit:
        raise ValueError(f"{printed!r} is not a number in {unit}")
    return float(match.group(1))


def bandwidth_kind(printed: str) -> str:
    """The link named in brackets in a DeepEP bandwidth cell: ``NVLink`` or ``RDMA``."""
    match = re.search(r"\((NVLink|RDMA)\)$", printed)
    if match is None:
        raise ValueError(f"{printed!r} names no link")
    return match.group(1)


def _filled(rows: tuple[tuple[str, ...], ...], columns: int) -> list[tuple[str, ...]]:
    """Body rows with their first `columns` cells filled down from the row above where blank (the Hybrid-EP
    tables print a rank count or an implementation once per group), the bold sub-header row dropped."""
    out: list[tuple[str, ...]] = []
    for row in rows:
        if all(c == "" for c in row[:columns]) and row[columns].startswith("**"):
            continue  # the second header row: "| | | **Dispatch (FP8)** | ..."
        out.append(tuple(c or out[-1][i] for i, c in enumerate(row[:columns])) + row[columns:])
    return out


def _plain(printed: str) -> float:
    """A Hybrid-EP cell: a bare number in GB/s, bold where the source highlights it (``**409.71**``)."""
    return float(printed.strip("*"))


def _ep_size(topology: str) -> int:
    """DeepEP V2's Topo cell: ``EP 8`` -> 8, ``EP 8 x 2`` -> 16."""
    match = re.fullmatch(r"EP (\d+)(?: x (\d+))?", topology)
    if match is None:
        raise ValueError(f"{topology!r} is no EP topology")
    return int(match.group(1)) * int(match.group(2) or 1)


def _gemm_columns(computation: str, bandwidth: str, speedup: str) -> dict[str, object]:
    return {"computation": computation, "computation_tflops": quantity(computation, "TFLOPS"),
            "memory_bandwidth": bandwidth, "memory_bandwidth_gbps": quantity(bandwidth, "GB/s"),
            "speedup": speedup, "speedup_x": quantity(speedup, "x")}


def _rows(name: str, table: MarkdownTable) -> list[dict[str, object]]:
    """The CSV rows (table columns only) for one source table."""
    if name == "deepep_normal":
        return [{"type": kind, "operation": operation, "num_ep": int(ep), "bottleneck_bandwidth": bw,
                 "bottleneck_bandwidth_gbps": quantity(bw, "GB/s"), "bandwidth_kind": bandwidth_kind(bw)}
                for kind, dispatch_ep, dispatch_bw, combine_ep, combine_bw in table.rows
                for operation, ep, bw in (("dispatch", dispatch_ep, dispatch_bw),
                                          ("combine", combine_ep, combine_bw))]
    if name == "deepep_low_latency":
        rows = []
        for dispatch_ep, d_lat, d_bw, combine_ep, c_lat, c_bw in table.rows:
            if dispatch_ep != combine_ep:
                raise ValueError(f"dispatch #EP {dispatch_ep} differs from combine #EP {combine_ep}")
            rows.append({"num_ep": int(dispatch_ep),
                         "dispatch_latency": d_lat, "dispatch_latency_us": quantity(d_lat, "us"),
                         "dispatch_rdma_bandwidth": d_bw, "dispatch_rdma_bandwidth_gbps": quantity(d_bw, "GB/s"),
                         "combine_latency": c_lat, "combine_latency_us": quantity(c_lat, "us"),
                         "combine_rdma_bandwidth": c_bw, "combine_rdma_bandwidth_gbps": quantity(c_bw, "GB/s")})
        return rows
    if name == "deepep_v2":
        return [{"gpu": arch, "nic_type": nic, "topology": topo, "num_ep": _ep_size(topo),
                 "dispatch_bandwidth": d, "dispatch_bandwidth_gbps": quantity(d, "GB/s"),
                 "combine_bandwidth": c, "combine_bandwidth_gbps": quantity(c, "GB/s"),
                 "bandwidth_kind": bandwidth_kind(d), "num_sms": int(sms.split()[0]), "sms_note": sms}
                for arch, nic, topo, d, c, sms in table.rows]
    if name == "hybrid_ep_h100":
        keys = ("torch_dispatch_fp8_gbps", "torch_dispatch_bf16_gbps", "torch_combine_gbps",
                "kernel_dispatch_fp8_gbps", "kernel_dispatch_bf16_gbps", "kernel_combine_gbps")
        return [{"num_ep": int(ranks), "num_sms": int(sms), **{k: _plain(v) for k, v in zip(keys, rest, strict=True)}}
                for ranks, sms, *rest in _filled(table.rows, 2)]
    if name == "hybrid_ep_b200":
        keys = ("dispatch_fp8_gbps", "dispatch_bf16_gbps", "combine_gbps")
        return [{"num_ep": 8, "implementation": impl.strip("*"), "measurement": kind, "num_sms": int(sms),
                 **{k: _plain(v) for k, v in zip(keys, rest, strict=True)}}
                for impl, kind, sms, *rest in _filled(table.rows, 2)]
    if name == "deepgemm_dense":
        return [{"m": int(m), "n": int(n), "k": int(k), **_gemm_columns(*rest)} for m, n, k, *rest in table.rows]
    if name in ("deepgemm_grouped_contiguous", "deepgemm_grouped_masked"):
        return [{"num_groups": int(g), "m_per_group": int(m), "n": int(n), "k": int(k), **_gemm_columns(*rest)}
                for g, m, n, k, *rest in table.rows]
    raise KeyError(name)


def table_from_source(name: str) -> pd.DataFrame:
    """The rows of table ``name`` rebuilt from its source excerpt, provenance columns first."""
    source = TABLES[name]
    table = source_table(name)
    provenance = {"repository": source.repository, "upstream_repository": source.upstream_repository,
                  "path": source.path, "commit": source.commit, "table": source.heading}
    out = []
    for row in _rows(name, table):
        kernel = measured_by(name, row)
        gpu = row.pop("gpu", source.gpu)
        out.append({**provenance, "gpu": gpu, "measured_commit": kernel.commit, "measured_date": kernel.date,
                    "kernel": kernel.label, **row})
    return pd.DataFrame(out)


def load_table(name: str) -> pd.DataFrame:
    """The shipped CSV ``data/published/<name>.csv`` (``name`` is a key of ``TABLES``)."""
    if name not in TABLES:
        raise KeyError(f"unknown published table {name!r}; known: {sorted(TABLES)}")
    return pd.read_csv(PUBLISHED_DIR / f"{name}.csv", dtype={"commit": str, "measured_commit": str},
                       keep_default_na=False, na_values=[""])  # "N/A" is a printed cell (no NIC), not a gap


def write_tables(directory: Path = PUBLISHED_DIR) -> None:
    """Write every table's CSV from its source excerpt (numbers printed as in the source)."""
    for name in TABLES:
        table_from_source(name).to_csv(directory / f"{name}.csv", index=False, float_format="%g")
