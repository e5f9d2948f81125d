"""The lazy safetensors reader and the streaming shard writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from undo_cli.checkpoint.safetensors_io import (
    INDEX_NAME,
    CheckpointReader,
    SafetensorsWriter,
    TensorSpec,
    file_order,
    parse_size,
    read_header,
    save_tensors,
)
from undo_cli.errors import DataError, UsageError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.10.w": torch.randn(7, 5, generator=g),
        "layers.2.w": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "half": torch.randn(6, generator=g).to(torch.float16),
        "double": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "bytes": torch.arange(5, dtype=torch.uint8),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def _load_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = f.get_tensor(name)
    return out


def test_single_file_roundtrip_loads_with_safe_open(tmp_path):
    tensors = _tensors()
    assert save_tensors(tensors, tmp_path) == ["model.safetensors"]
    _assert_same(_load_all(tmp_path), tensors)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with CheckpointReader(tmp_path) as reader:
        _assert_same({n: reader.read(n) for n in reader.names}, tensors)


def test_header_is_padded_and_data_aligned(tmp_path):
    save_tensors(_tensors(), tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    assert raw[8:8 + n].rstrip(b" ").endswith(b"}")
    header = read_header(tmp_path / "model.safetensors")
    for entry in header.entries.values():
        assert entry.offset % entry.itemsize == 0, entry.name


def test_same_bytes_as_safetensors_own_writer(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"model.layers.{i}.w": torch.randn(4, 3, generator=g) for i in range(12)}
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    save_tensors(tensors, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == \
        (tmp_path / "reference.safetensors").read_bytes()


def test_sharded_roundtrip_with_index(tmp_path):
    tensors = _tensors()
    files = save_tensors(tensors, tmp_path, max_shard_size=150)
    assert len(files) > 1
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values())
    _assert_same(_load_all(tmp_path), tensors)
    with CheckpointReader(tmp_path) as reader:
        assert set(reader.names) == set(tensors)
        _assert_same({n: reader.read(n) for n in reader.names}, tensors)


def test_read_range_and_bytes(tmp_path):
    w = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    save_tensors({"w": w}, tmp_path)
    with CheckpointReader(tmp_path) as reader:
        got = reader.read_range("w", 13, 7)
        assert got.dtype == np.uint8
        assert np.array_equal(got.view(np.float32), w.reshape(-1)[13:20].numpy())
        out = np.empty(64, dtype=np.uint8)
        got = reader.read_range("w", 0, 3, out=out)
        assert np.shares_memory(got, out) and got.size == 12
        assert np.array_equal(got.view(np.float32), w.reshape(-1)[:3].numpy())
        assert reader.read_bytes("w", 4, 4).view(np.float32)[0] == 1.0
        with pytest.raises(ValueError):
            reader.read_bytes("w", 396, 8)


def test_writer_streams_pieces_in_order(tmp_path):
    specs = file_order([TensorSpec("b", "F32", (4,), 16), TensorSpec("a", "BF16", (2,), 4)])
    assert [s.name for s in specs] == ["b", "a"]  # larger elements first: aligned
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"format": "pt"}) as w:
        w.write("b", torch.tensor([1.0, 2.0]))
        w.write("b", torch.tensor([3.0, 4.0]))
        w.write("a", torch.tensor([5.0, 6.0], dtype=torch.bfloat16))
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.get_tensor("b").tolist() == [1.0, 2.0, 3.0, 4.0]
        assert f.get_tensor("a").tolist() == [5.0, 6.0]


def test_writer_refuses_wrong_order_extra_bytes_and_early_close(tmp_path):
    specs = [TensorSpec("a", "F32", (2,), 8), TensorSpec("b", "F32", (1,), 4)]
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="expected 'a'"):
        w.write("b", torch.zeros(1))
    with pytest.raises(ValueError, match="too many bytes"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="before all of tensor 'b'"):
        w.close()


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("10kb") == 10_000
    assert parse_size("1234") == 1234
    assert parse_size(77) == 77
    for bad in ("", "two GB", "5 parsecs", "0", "-3MB"):
        with pytest.raises(UsageError):
            parse_size(bad)


# ------------------------------------------------------------------------------------------
# Corrupt files: a DataError naming the file, never a crash
# ------------------------------------------------------------------------------------------

def _good_file(tmp_path: Path) -> Path:
    save_tensors({"w": torch.ones(4, 4), "b": torch.ones(4)}, tmp_path)
    return tmp_path / "model.safetensors"


def _rewrite_header(path: Path, header: bytes, data: bytes | None = None) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rest = raw[8 + n:] if data is None else data
    path.write_bytes(struct.pack("<Q", len(header)) + header + rest)


@pytest.mark.parametrize("case, message", [
    ("short", "only 3 bytes"),
    ("huge_length", "header length"),
    ("zero_length", "header length"),
    ("bad_json", "not valid JSON"),
    ("not_object", "not a JSON object"),
    ("bad_offsets", "data_offsets"),
    ("wrong_size", "should take"),
    ("bad_shape", "invalid shape"),
    ("truncated", "truncated"),
    ("overlap", "overlap"),
])
def test_corrupt_files_raise_data_error(tmp_path, case, message):
    path = _good_file(tmp_path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if case == "short":
        path.write_bytes(b"abc")
    elif case == "huge_length":
        path.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    elif case == "zero_length":
        path.write_bytes(struct.pack("<Q", 0) + raw[8:])
    elif case == "bad_json":
        _rewrite_header(path, b"{not json" + b" " * 7)
    elif case == "not_object":
        _rewrite_header(path, b"[1, 2]  ")
    elif case == "bad_offsets":
        header["w"]["data_offsets"] = [10, 2]
        _rewrite_header(path, json.dumps(header).encode())
    elif case == "wrong_size":
        header["w"]["shape"] = [5, 4]
        _rewrite_header(path, json.dumps(header).encode())
    elif case == "bad_shape":
        header["w"]["shape"] = [4, -4]
        _rewrite_header(path, json.dumps(header).encode())
    elif case == "truncated":
        path.write_bytes(raw[:-10])
    elif case == "overlap":
        w0 = header["w"]["data_offsets"][0]
        header["b"]["data_offsets"] = [w0 + 8, w0 + 24]
        _rewrite_header(path, json.dumps(header).encode())
    with pytest.raises(DataError, match=message) as info:
        CheckpointReader(tmp_path)
    assert str(path) in str(info.value)


def test_index_problems_raise_data_error(tmp_path):
    save_tensors({"a": torch.ones(10), "b": torch.ones(10)}, tmp_path, max_shard_size=40)
    index_file = tmp_path / INDEX_NAME
    index = json.loads(index_file.read_text())

    index_file.write_text("{oops")
    with pytest.raises(DataError, match="not a valid weight index: not JSON"):
        CheckpointReader(tmp_path)
    for shape, why in (("[]", "a JSON list"), ('{"weight_map": []}', "weight_map"),
                       ('{"weight_map": {"a": 3}}', "not a file name")):
        index_file.write_text(shape)
        with pytest.raises(DataError, match=why):
            CheckpointReader(tmp_path)
    for outside in ("../x.safetensors", "/etc/x.safetensors", "a/../../x.safetensors"):
        index_file.write_text(json.dumps({"weight_map": {"a": outside}}))
        with pytest.raises(DataError, match="outside the checkpoint directory"):
            CheckpointReader(tmp_path)

    missing = "model-00009-of-00009.safetensors"
    broken = dict(index, weight_map={**index["weight_map"], "c": missing})
    index_file.write_text(json.dumps(broken))
    with pytest.raises(DataError, match="do not exist"):
        CheckpointReader(tmp_path)

    wm = index["weight_map"]
    swapped = dict(index, weight_map={"a": wm["b"], "b": wm["a"]})
    index_file.write_text(json.dumps(swapped))
    with pytest.raises(DataError, match="does not hold it"):
        CheckpointReader(tmp_path)


def test_tensor_stored_twice_is_refused(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(DataError, match="stored twice"):
        CheckpointReader(tmp_path)
