"""Importers: real ESFT and FLAME files round-trip; an SGLang per_token dump built in its exact structure."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data_path
from moetuner.apps.import_trace import main as import_main
from moetuner.importers import RoutingImportError, import_routing
from moetuner.trace import load_trace, save_trace


def esft_rows(path: Path) -> list[tuple[list[int], list[float]]]:
    """An independent parse of one ESFT layer file: fields before / after the empty field."""
    rows = []
    with path.open(newline="") as f:
        for fields in csv.reader(f, delimiter="\t"):
            gap = fields.index("")
            rows.append(([int(x) for x in fields[:gap]], [float(x) for x in fields[gap + 1:]]))
    return rows


@pytest.mark.parametrize("task", ["intent", "law"])
def test_esft_ids_and_weights_equal_the_source_files(task: str, tmp_path: Path) -> None:
    folder = shared_data_path("esft-deepseek-v2-lite", task)
    trace = load_trace(save_trace(import_routing("esft", folder), tmp_path / "t.safetensors"))
    assert trace.moe_layers == list(range(1, 27)) and trace.num_experts == 64 and trace.top_k == 6
    assert (trace.model, trace.hidden_size, trace.moe_intermediate_size) == ("deepseek-ai/DeepSeek-V2-Lite", 2048, 1408)
    assert trace.extra["n_group"] == "1"  # DeepSeek-V2-Lite's config.json: n_group 1
    for position, layer in [(0, 1), (12, 13), (25, 26)]:
        rows = esft_rows(folder / f"expert_weights_{layer}.txt")
        assert trace.seq_ids.tolist() == [s for s, (ids, _) in enumerate(rows) for _ in range(len(ids) // 6)]
        np.testing.assert_array_equal(trace.topk_ids[:, position].ravel(), np.concatenate([i for i, _ in rows]))
        np.testing.assert_allclose(trace.topk_weights[:, position].ravel(), np.concatenate([w for _, w in rows]),
                                   rtol=1e-6)


def test_esft_token_count_matches_the_data_readme() -> None:
    assert import_routing("esft", shared_data_path("esft-deepseek-v2-lite", "law")).num_tokens == 8327


@pytest.mark.parametrize("name", ["prefill.npz", "decode_first10.npz"])
def test_flame_ids_equal_the_source_arrays(name: str, tmp_path: Path) -> None:
    path = shared_data_path("flame-moe-290m", name)
    trace = load_trace(save_trace(import_routing("flame", path), tmp_path / "t.safetensors"))
    src = np.load(path)
    ids, scores = src["topk_ids"], src["topk_scores"]
    assert trace.moe_layers == src["moe_layers"].tolist() == list(range(2, 10))
    assert (trace.hidden_size, trace.moe_intermediate_size) == (1024, 704)
    if ids.ndim == 3:  # [L, T, k]; token t belongs to sequence t // seq_len
        seq_len = int(src["seq_len"])
        for t in (0, 63, 64, 2047):
            np.testing.assert_array_equal(trace.topk_ids[t], ids[:, t])
            assert trace.seq_ids[t] == t // seq_len
        np.testing.assert_array_equal(trace.topk_weights[5], scores[:, 5])
    else:  # [positions, L, S, k]; token (s, p) sits at s * positions + p
        positions = ids.shape[0]
        for s, p in [(0, 0), (0, 9), (17, 3), (63, 9)]:
            np.testing.assert_array_equal(trace.topk_ids[s * positions + p], ids[p, :, s])
            np.testing.assert_array_equal(trace.topk_weights[s * positions + p], scores[p, :, s])
            assert trace.seq_ids[s * positions + p] == s


def test_overrides_replace_model_metadata() -> None:
    trace = import_routing("flame", shared_data_path("flame-moe-290m", "decode_first10.npz"),
                           model="mine", hidden_size=512, moe_intermediate_size=None)
    assert (trace.model, trace.hidden_size, trace.moe_intermediate_size) == ("mine", 512, 704)


# An SGLang model of 3 decoder layers (layer 0 dense), 4 logical experts in 6 physical slots, top-2.
PHY2LOG = [[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 2, 1], [0, 1, 2, 3, 0, 3]]


def recorded(physical: list[list[list[int]]]) -> torch.Tensor:
    """topk_ids_of_layer as the gatherer keeps it: int32 [3 layers, n, 8], -1 where not written."""
    out = torch.full((3, len(physical[0]), 8), -1, dtype=torch.int32)
    for layer, rows in zip((1, 2), physical):
        out[layer, :, :2] = torch.tensor(rows, dtype=torch.int32)
    return out


def sglang_dump(path: Path, phy2log: list[list[int]] = PHY2LOG) -> Path:
    extend = recorded([[[0, 5], [4, 2], [1, 3]], [[5, 2], [0, 1], [4, 3]]])  # 3 tokens: sequences of 2 and 1
    decode = recorded([[[2, 3], [-1, -1]], [[1, 4], [-1, -1]]])  # 1 token + 1 padded token
    records = [
        {"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary", "input_ids": [11, 12, 13],
         "positions": [0, 1, 0], "extend_seq_lens": [2, 1], "forward_mode": 1,
         "topk_ids_of_layer": extend, "misc_objects": []},
        {"forward_pass_id": 1, "rank": 0, "gatherer_key": "primary", "input_ids": [14, 0],
         "positions": [2, 0], "extend_seq_lens": None, "forward_mode": 2,
         "topk_ids_of_layer": decode, "misc_objects": []},
    ]
    torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(phy2log)}, path)
    return path


def test_sglang_dump_maps_physical_slots_to_logical_experts(tmp_path: Path) -> None:
    trace = import_routing("sglang", sglang_dump(tmp_path / "d.pt"), model="m", hidden_size=8,
                           moe_intermediate_size=4)
    # layer 1 maps through PHY2LOG[1], layer 2 through PHY2LOG[2]; the padded token is dropped
    expected = [[[3, 1], [3, 2]], [[2, 1], [0, 1]], [[2, 0], [0, 3]], [[1, 0], [1, 0]]]
    assert trace.topk_ids.tolist() == expected
    assert trace.moe_layers == [1, 2] and trace.num_experts == 4 and trace.top_k == 2
    assert trace.extra["num_hidden_layers"] == "3"  # the dump has a row per decoder layer, dense ones included
    assert trace.seq_ids.tolist() == [0, 0, 1, 2]
    assert "n_group" not in trace.extra  # the dump does not record the model's groups
    grouped = import_routing("sglang", sglang_dump(tmp_path / "e.pt"), model="m", hidden_size=8,
                             moe_intermediate_size=4, n_group=2)
    assert grouped.n_group == 2


def test_sglang_needs_the_model_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(RoutingImportError, match="hidden_size=... moe_intermediate_size=..."):
        import_routing("sglang", sglang_dump(tmp_path / "d.pt"), model="m")


@pytest.mark.parametrize(("dump", "message"), [
    ({"logical_count": torch.zeros(3, 4)}, "per_token"),
    ({"records": [], "last_physical_to_logical_map": torch.zeros(3, 6)}, "no forward passes"),
])
def test_sglang_wrong_dump_kind(tmp_path: Path, dump: dict, message: str) -> None:
    torch.save(dump, tmp_path / "d.pt")
    with pytest.raises(RoutingImportError, match=message):
        import_routing("sglang", tmp_path / "d.pt", model="m", hidden_size=8, moe_intermediate_size=4)


def test_sglang_physical_id_beyond_the_map(tmp_path: Path) -> None:
    dump = sglang_dump(tmp_path / "d.pt", phy2log=[row[:5] for row in PHY2LOG])  # slot 5 no longer exists
    with pytest.raises(RoutingImportError, match=r"outside \[0, 5\)"):
        import_routing("sglang", dump, model="m", hidden_size=8, moe_intermediate_size=4)


def test_esft_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "expert_weights_1.txt").write_text("1\t2\t3\t4\t5\t6\t\t0.1\t0.1\t0.1\t0.1\t0.1\t0.1\n1\t2\t3\n")
    with pytest.raises(RoutingImportError, match=r"expert_weights_1.txt:2: expected ids, an empty field"):
        import_routing("esft", tmp_path)


def test_esft_layers_must_hold_the_same_sequences(tmp_path: Path) -> None:
    line = "1\t2\t3\t4\t5\t6\t\t" + "\t".join(["0.1"] * 6) + "\n"
    (tmp_path / "expert_weights_1.txt").write_text(line * 2)
    (tmp_path / "expert_weights_2.txt").write_text(line)
    with pytest.raises(RoutingImportError, match="same sequences in the same order"):
        import_routing("esft", tmp_path)


@pytest.mark.parametrize(("fmt", "name", "message"), [
    ("esft", "empty", "no expert_weights"), ("flame", "absent.npz", "not found"), ("parquet", "x", "unknown format"),
])
def test_bad_source_gets_a_clear_error(tmp_path: Path, fmt: str, name: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RoutingImportError, match=message):
        import_routing(fmt, tmp_path / name)


def test_import_app_writes_the_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = shared_data_path("flame-moe-290m", "prefill.npz")
    out = tmp_path / "flame.safetensors"
    monkeypatch.setattr(sys, "argv", ["moetuner-import", "format=flame", f"path={src}", f"out={out}",
                                      "model=flame-test", "mlflow=off"])
    import_main()
    trace = load_trace(out)
    assert trace.model == "flame-test" and trace.num_tokens == 2048
    np.testing.assert_array_equal(trace.topk_ids, import_routing("flame", src).topk_ids)
