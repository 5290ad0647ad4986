"""The trace format moetuner-trace/1 (moetuner/trace.py): round trip and every bad-input error."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import moetuner.trace as trace_module
from moetuner.trace import Trace, TraceError, load_trace, save_trace


def small_trace(num_experts: int = 4) -> Trace:
    ids = np.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]], [[1, 3], [0, 2]]], dtype=np.int16)  # [3, 2, 2]
    return Trace(topk_ids=ids, seq_ids=np.array([0, 0, 7], dtype=np.int32), model="tiny", num_experts=num_experts,
                 moe_layers=[1, 3], source="hand", hidden_size=16, moe_intermediate_size=8,
                 topk_weights=np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 2, 2), extra={"dataset": "d"})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    original = small_trace()
    back = load_trace(save_trace(original, tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(back.topk_ids, original.topk_ids)
    np.testing.assert_array_equal(back.seq_ids, original.seq_ids)
    np.testing.assert_array_equal(back.topk_weights, original.topk_weights)
    assert (back.model, back.num_experts, back.moe_layers, back.source, back.hidden_size,
            back.moe_intermediate_size, back.dtype, back.extra) == ("tiny", 4, [1, 3], "hand", 16, 8, "bfloat16",
                                                                    {"dataset": "d"})
    assert back.top_k == 2 and back.sequences.tolist() == [0, 7]


def test_round_trip_without_weights(tmp_path: Path) -> None:
    back = load_trace(save_trace(replace(small_trace(), topk_weights=None), tmp_path / "t.safetensors"))
    assert back.topk_weights is None


def test_n_group_is_optional_and_kept(tmp_path: Path) -> None:
    """Absent: 1 (a model without expert groups); recorded: read back as written."""
    assert small_trace().n_group == 1
    back = load_trace(save_trace(replace(small_trace(), extra={"n_group": "2"}), tmp_path / "t.safetensors"))
    assert back.n_group == 2 and back.extra["n_group"] == "2"


@pytest.mark.parametrize(("change", "message"), [
    ({"extra": {"n_group": "3"}}, "n_group='3' must be a positive integer dividing num_experts=4"),
    ({"extra": {"n_group": "0"}}, "n_group='0' must be a positive integer"),
    ({"num_experts": 3}, "expert id 3 outside [0, 3)"),
    ({"seq_ids": np.zeros(2, dtype=np.int32)}, "one sequence id per token"),
    ({"moe_layers": [1]}, "moe_layers lists 1 layers"),
    ({"topk_ids": np.zeros((3, 2), dtype=np.int16)}, "must be [T, L, k]"),
    ({"topk_ids": np.zeros((3, 2, 2), dtype=np.int32)}, "must be int16"),
    ({"topk_weights": np.zeros((3, 2, 1), dtype=np.float32)}, "topk_weights shape"),
])
def test_invalid_trace_is_refused_and_leaves_no_file(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(TraceError, match=re.escape(message)):
        save_trace(replace(small_trace(), **change), tmp_path / "t.safetensors")
    assert leftovers(tmp_path) == []


def test_negative_id_in_file_is_refused(tmp_path: Path) -> None:
    trace = small_trace()
    ids = trace.topk_ids.copy()
    ids[1, 0, 0] = -1
    path = tmp_path / "t.safetensors"
    save_file({"topk_ids": ids, "seq_ids": trace.seq_ids}, str(path), metadata=trace.metadata())
    with pytest.raises(TraceError, match=r"expert id -1 outside \[0, 4\)"):
        load_trace(path)


def write_raw(path: Path, trace: Trace, drop_tensor: str | None = None, **meta: str | None) -> Path:
    tensors = {"topk_ids": trace.topk_ids, "seq_ids": trace.seq_ids}
    tensors.pop(drop_tensor, None)
    metadata = {k: v for k, v in {**trace.metadata(), **meta}.items() if v is not None}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(("drop_tensor", "meta", "message"), [
    (None, {"hidden_size": None}, "missing metadata field"),
    ("seq_ids", {}, "missing tensor 'seq_ids'"),
    (None, {"format": "other/1"}, "format is 'other/1'"),
    (None, {"top_k": "3"}, "metadata top_k=3 but topk_ids has k=2"),
    (None, {"num_experts": "four"}, "must be an integer"),
    (None, {"moe_layers": "1,3"}, "JSON list of integers"),
])
def test_malformed_file_names_the_problem(tmp_path: Path, drop_tensor: str | None, meta: dict, message: str) -> None:
    path = write_raw(tmp_path / "t.safetensors", small_trace(), drop_tensor, **meta)
    with pytest.raises(TraceError, match=message) as err:
        load_trace(path)
    assert str(path) in str(err.value)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = save_trace(small_trace(), tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(TraceError, match="truncated or corrupt"):
        load_trace(path)


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="moetuner-import or moetuner-synth"):
        load_trace(tmp_path / "absent.safetensors")


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_trace(small_trace(), tmp_path / "t.safetensors")
    before = path.read_bytes()

    def crash(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(trace_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_trace(replace(small_trace(), model="other"), path)
    assert path.read_bytes() == before and leftovers(tmp_path) == ["t.safetensors"]
    assert load_trace(path).model == "tiny"


def test_with_weights_casts_or_drops_the_gate_weights(tmp_path: Path) -> None:
    original = small_trace()  # weights 0, 1/11, ..., 1
    half = original.with_weights("float16")
    assert half.topk_weights.dtype == np.float16 and original.topk_weights.dtype == np.float32
    # float16 has 11 significant bits: values in [0.5, 1] move by at most 2**-12
    assert np.abs(half.topk_weights.astype(np.float32) - original.topk_weights).max() <= 2.0 ** -12
    assert load_trace(save_trace(half, tmp_path / "h.safetensors")).topk_weights.dtype == np.float16
    assert original.with_weights("none").topk_weights is None
    np.testing.assert_array_equal(original.with_weights("float32").topk_weights, original.topk_weights)
    with pytest.raises(TraceError, match=r"weights='bfloat16'; choose one of \['float16', 'float32', 'none'\]"):
        original.with_weights("bfloat16")


def test_num_hidden_layers_must_exceed_the_last_moe_layer() -> None:
    ids = np.zeros((2, 2, 1), dtype=np.int16)
    make = lambda total: Trace(topk_ids=ids, seq_ids=np.zeros(2, np.int32), model="m", num_experts=2,  # noqa: E731
                               moe_layers=[1, 2], source="s", hidden_size=4, moe_intermediate_size=4,
                               extra={"num_hidden_layers": total})
    make("3").validate()  # layers 0 (dense), 1, 2
    for bad in ("2", "x"):
        with pytest.raises(TraceError, match=f"num_hidden_layers='{bad}' must be an integer above the last MoE layer 2"):
            make(bad).validate()
