"""``SafetensorsStream``: bytes the safetensors library reads back bit-identically, and
headers that ``parse_safetensors_header`` rejects naming the problem."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from megatron_sdpg.formats.safetensors_stream import SafetensorsStream
from megatron_sdpg.formats.tensor_codec import decode_safetensors_blob


def _special(dtype: torch.dtype) -> torch.Tensor:
    """Values whose bits a careless conversion would change: -0, inf, NaN, subnormals."""
    return torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.5], dtype=dtype)


def _named() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(33, 17, generator=gen)
    return [
        ("model.norm.weight", torch.randn(17, generator=gen).bfloat16()),  # 2-byte first: layout must realign
        ("w32", w32),
        ("tied", w32),  # shares storage with w32 (tied embeddings)
        ("bf16", torch.randn(5, 7, 3, generator=gen).bfloat16()),
        ("bf16_special", _special(torch.bfloat16)),
        ("fp32_special", _special(torch.float32)),
        ("f64", torch.randn(3, generator=gen, dtype=torch.float64)),
        ("i64", torch.arange(-3, 4)),
        ("mask", torch.tensor([True, False, True])),
        ("empty", torch.empty(0, 4)),
        ("scalar", torch.tensor(2.5)),
        ("strided", torch.randn(6, 4, generator=gen).t()),  # not contiguous: written in logical order
    ]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


@pytest.mark.parametrize("piece_bytes", [7, 4 * 2**20])
def test_round_trip_is_bit_identical_through_the_library_and_our_decoder(tmp_path, piece_bytes):
    named = _named()
    stream = SafetensorsStream(named)
    blob = b"".join(stream.pieces(piece_bytes))
    assert len(blob) == stream.nbytes
    path = tmp_path / "x.safetensors"
    stream.write_file(str(path))
    assert path.read_bytes() == blob
    by_library = st_load(blob)
    with safe_open(str(path), framework="pt") as f:  # the library's mmap reader
        by_mmap = {k: f.get_tensor(k) for k in f.keys()}
    ours = dict(decode_safetensors_blob(blob))
    for name, want in named:
        for got in (by_library[name], by_mmap[name], ours[name]):
            assert _same_bits(got, want), name


def test_layout_is_aligned_and_padded():
    stream = SafetensorsStream(_named())
    (hlen,) = struct.unpack("<Q", stream.header[:8])
    assert hlen % 8 == 0 and len(stream.header) == 8 + hlen
    header = json.loads(stream.header[8:])
    assert header.pop("__metadata__") == {"format": "pt"}
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "BF16": 2, "BOOL": 1}
    for name, info in header.items():
        assert info["data_offsets"][0] % itemsize[info["dtype"]] == 0, name
    assert stream.nbytes == 8 + hlen + max(info["data_offsets"][1] for info in header.values())


def test_bad_input_is_rejected_naming_it():
    with pytest.raises(ValueError, match="tensor 'a' appears twice"):
        SafetensorsStream([("a", torch.ones(2)), ("a", torch.ones(2))])
    with pytest.raises(ValueError, match="tensor 'c': dtype torch.complex64 has no safetensors name"):
        SafetensorsStream([("c", torch.ones(2, dtype=torch.complex64))])


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}, r"entry for 'w': unknown dtype 'F7' \(known: F64"),
    ({"shape": [2], "data_offsets": [0, 8]}, r"entry for 'w': no 'dtype'"),
    ({"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}, r"entry for 'w': shape \[2, -1\] is not a list"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, r"entry for 'w': data_offsets \[0\] is not a pair"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"tensor 'w' has offsets 0..8, inconsistent with shape \[3\] F32"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, r"tensor 'w' has offsets 0..16, .* 8-byte data section"),
    ("F32", r"entry for 'w': expected an object, got str"),
])
def test_malformed_header_entry_names_the_problem(entry, message):
    with pytest.raises(ValueError, match="^blob: (bad safetensors header )?" + message):
        decode_safetensors_blob(_with_header({"w": entry}, bytes(8)), what="blob")


def test_malformed_header_framing_names_the_problem():
    good = b"".join(SafetensorsStream([("w", torch.ones(2))]).pieces())
    with pytest.raises(ValueError, match=r"x: not a safetensors blob \(header length 999 does not fit a"):
        decode_safetensors_blob(struct.pack("<Q", 999) + good[8:], what="x")
    with pytest.raises(ValueError, match="x: bad safetensors header"):
        decode_safetensors_blob(good[:8] + b"{" + b"!" * (len(good) - 9), what="x")
    with pytest.raises(ValueError, match="x: payload too short for safetensors"):
        decode_safetensors_blob(good[:6], what="x")
