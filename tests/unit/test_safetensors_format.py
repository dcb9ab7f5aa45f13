"""The planned streaming safetensors writer and the zero-copy reader, checked against the safetensors library."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_sdpg.weights.export_files import plan_shards, shard_file_name
from megatron_sdpg.formats.hf_io import SafetensorsReader
from megatron_sdpg.formats.safetensors_format import StreamingSafetensorsWriter, TensorEntry, read_header


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=gen),
        "c.scalar": torch.tensor(2.5, dtype=torch.float64),
        "d.ids": torch.arange(6, dtype=torch.int64).view(2, 3),
        "e.empty": torch.empty(0, 4),
        "f.t": torch.randn(4, 6, generator=gen).t(),  # non-contiguous input
    }


def _write(path: str, tensors: dict[str, torch.Tensor]) -> None:
    w = StreamingSafetensorsWriter(path, [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v)
    w.close()


def test_round_trip_is_bit_identical_through_the_library_and_our_reader(tmp_path):
    tensors = _tensors()
    _write(str(tmp_path / "model.safetensors"), tensors)
    assert not os.path.exists(tmp_path / "model.safetensors.tmp")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    ours = SafetensorsReader(str(tmp_path))
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


def test_reader_views_are_private_copies_on_write(tmp_path):
    tensors = {"w": torch.arange(4096 * 3, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))  # written by the library
    reader = SafetensorsReader(str(tmp_path))
    view = reader["w"]
    assert torch.equal(view, tensors["w"])
    view.add_(1.0)  # must not reach the file
    assert torch.equal(reader["w"], tensors["w"])


def test_writer_names_the_tensor_out_of_order_misshapen_or_missing(tmp_path):
    path = str(tmp_path / "x.safetensors")
    entries = [TensorEntry("first", (2, 3), torch.float32), TensorEntry("second", (4,), torch.bfloat16)]
    w = StreamingSafetensorsWriter(path, entries)
    with pytest.raises(ValueError, match="got tensor 'second' where 'first' was planned next"):
        w.write("second", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"tensor 'first' is \(3, 2\) torch.float32, planned \(2, 3\)"):
        w.write("first", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="tensor 'first' is .* torch.float16, planned"):
        w.write("first", torch.zeros(2, 3, dtype=torch.float16))
    w.write("first", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tensor 'second' was planned but not written"):
        w.close()
    assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
    with pytest.raises(ValueError, match="'dup' planned twice"):
        StreamingSafetensorsWriter(path, [TensorEntry("dup", (1,), torch.float32)] * 2)


def test_write_rows_stacks_pieces_without_concatenating_and_checks_the_stacked_shape(tmp_path):
    path = str(tmp_path / "rows.safetensors")
    full = torch.randn(9, 4)
    w = StreamingSafetensorsWriter(path, [TensorEntry("w", (9, 4), torch.float32), TensorEntry("v", (5,), torch.float32)])
    with pytest.raises(ValueError, match=r"tensor 'w' is 2 pieces .* planned \(9, 4\)"):
        w.write_rows("w", [full[:2], full[2:8]])  # 8 rows
    with pytest.raises(ValueError, match=r"tensor 'w' is 2 pieces"):
        w.write_rows("w", [full[:2], full[2:, :3]])  # other columns
    w.write_rows("w", [full[:2], full[2:3], full[3:]])
    w.write_rows("v", [torch.arange(2.0), torch.arange(3.0)])
    w.close()
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), full)
        assert torch.equal(f.get_tensor("v"), torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0]))


def test_malformed_or_truncated_files_are_named(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(4, 4)}, path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-8])  # truncated: w's bytes run past the end
    with pytest.raises(ValueError, match="tensor 'w' .* does not match its shape or the file size"):
        SafetensorsReader(str(tmp_path))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(ValueError, match="tensor 'w' .* does not match its shape"):
        read_header(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ValueError, match="header is not valid JSON"):
        read_header(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10**12))
    with pytest.raises(ValueError, match="header length"):
        read_header(path)


def test_plan_shards_by_size_per_writer():
    def e(name, n):
        return TensorEntry(name, (n,), torch.float32)

    per_rank = [[e("a", 10), e("b", 10), e("c", 30)], [], [e("d", 100), e("e", 1)]]
    shards = plan_shards(per_rank, max_shard_bytes=80)
    assert [(r, [x.name for x in es]) for r, es in shards] == [(0, ["a", "b"]), (0, ["c"]), (2, ["d"]), (2, ["e"])]
    assert shard_file_name(0, 4) == "model-00001-of-00004.safetensors"
