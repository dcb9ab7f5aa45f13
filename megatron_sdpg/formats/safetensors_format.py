"""The safetensors file format, for streaming: a planned writer and zero-copy tensor views.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}``, padded with spaces to a multiple of 8), then the tensors' bytes, back to
back, at those offsets (relative to the end of the header).

:class:`StreamingSafetensorsWriter` knows every tensor's name, shape and dtype
up front (a conversion plans its output from the mapping), writes the header
first and then each tensor's bytes straight from the tensor's memory as it is
produced: nothing is held back and nothing is copied into a staging buffer.
:func:`read_header` and :func:`tensor_view` read a file the other way round:
a tensor is a copy-on-write view of just its pages, mapped on demand and unmapped
when the tensor is dropped.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

# safetensors dtype strings (the format's spec) -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPES = SAFETENSORS_DTYPES
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its name, shape, dtype and byte range (data section)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a flat ``memoryview`` (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> tuple[bytes, list[TensorEntry]]:
    """The file prefix (length + padded JSON) for ``entries`` stored in this order.

    Returns:
        ``(prefix bytes, entries with their byte ranges filled in)``.

    Raises:
        ValueError: a name is repeated or a dtype has no safetensors name.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    placed, offset = [], 0
    for e in entries:
        if e.name in header:
            raise ValueError(f"tensor {e.name!r} planned twice")
        if e.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {e.name!r}: dtype {e.dtype} has no safetensors name")
        placed.append(TensorEntry(e.name, tuple(e.shape), e.dtype, offset, offset + e.nbytes))
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, placed


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose tensors are known before their data.

    The header goes out at once; :meth:`write` then appends each tensor's bytes in
    the planned order, directly from the tensor's memory. The file is written as
    ``<path>.tmp`` and renamed to ``path`` by :meth:`close` once every tensor is in.

    Args:
        path: The file to write.
        entries: Every tensor (name, shape, dtype) in the order they will be written.
        metadata: The header's ``__metadata__`` (default ``{"format": "pt"}``, as ``transformers`` writes).

    Raises:
        ValueError: (from :meth:`write` / :meth:`close`) a tensor out of order, of another
            shape or dtype than planned, or missing; the message names it and the file.
    """

    def __init__(self, path: str, entries: list[TensorEntry], metadata: dict[str, str] | None = None):
        self.path = path
        prefix, self.entries = encode_header(entries, metadata)
        self._next = 0
        self._file = open(path + ".tmp", "wb")
        self._file.write(prefix)
        self.nbytes = sum(e.nbytes for e in self.entries)

    @property
    def done(self) -> bool:
        """Whether every planned tensor has been written."""
        return self._next == len(self.entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends ``tensor``'s bytes; it must be the next planned tensor, of the planned shape and dtype."""
        self.write_rows(name, [tensor])

    def write_rows(self, name: str, pieces: list[torch.Tensor]) -> None:
        """Appends a tensor given as ``pieces`` stacked along dim 0 (no concatenation: each is written in turn).

        Raises:
            ValueError: not the next planned tensor, or the stacked shape or a dtype is not the planned one.
        """
        if self._next >= len(self.entries):
            raise ValueError(f"{self.path}: tensor {name!r} was not planned for this file (all tensors written)")
        e = self.entries[self._next]
        if name != e.name:
            raise ValueError(f"{self.path}: got tensor {name!r} where {e.name!r} was planned next")
        if len(pieces) == 1:
            shape, got = tuple(pieces[0].shape), tuple(pieces[0].shape)
        else:
            shape = (sum(p.shape[0] for p in pieces), *e.shape[1:])
            if any(p.dim() == 0 or tuple(p.shape[1:]) != e.shape[1:] for p in pieces):
                shape = None
            got = f"{len(pieces)} pieces {[tuple(p.shape) for p in pieces[:3]]}..."
        if shape != e.shape or any(p.dtype != e.dtype for p in pieces):
            dtype = pieces[0].dtype if pieces else None
            raise ValueError(f"{self.path}: tensor {name!r} is {got} {dtype}, planned {e.shape} {e.dtype}")
        for p in pieces:
            if p.numel():
                self._file.write(byte_view(p.detach().to("cpu").contiguous()))
        self._next += 1

    def close(self) -> None:
        """Renames the finished file into place.

        Raises:
            ValueError: planned tensors were not written (naming the first one); the
                partial file is removed.
        """
        self._file.close()
        if self._next < len(self.entries):
            os.remove(self.path + ".tmp")
            missing = self.entries[self._next].name
            raise ValueError(f"{self.path}: tensor {missing!r} was planned but not written "
                             f"({len(self.entries) - self._next} missing)")
        os.replace(self.path + ".tmp", self.path)

    def abort(self) -> None:
        """Closes and removes the partial file (after an error elsewhere)."""
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.path + ".tmp"):
            os.remove(self.path + ".tmp")


def read_header(path: str) -> tuple[int, dict[str, TensorEntry]]:
    """``(data section offset, {name: entry})`` of a safetensors file.

    Raises:
        ValueError: the file is truncated or its header is malformed (naming the file
            and, where it applies, the tensor).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:

        def header_bytes(n: int) -> bytes:
            if n > _MAX_HEADER:
                raise ValueError(f"{path}: safetensors header length {n} is over the format's limit")
            return f.read(n)

        parsed, start = parse_safetensors_header(f.read(8), header_bytes, size, path)
    entries = {name: TensorEntry(name, tuple(shape), dtype, begin, end) for name, dtype, shape, begin, end in parsed}
    return start, entries


def tensor_view(path: str, data_start: int, entry: TensorEntry) -> torch.Tensor:
    """A writable copy-on-write view of one tensor's bytes in ``path`` (no copy made).

    Only the pages of this tensor are mapped; they are unmapped when the returned
    tensor (and every view of it) is gone. Writing to it never changes the file.
    """
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    begin = data_start + entry.begin
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), begin - aligned + entry.nbytes, access=mmap.ACCESS_COPY, offset=aligned)
    flat = torch.frombuffer(mm, dtype=torch.uint8, count=entry.nbytes, offset=begin - aligned)
    return flat.view(entry.dtype).view(entry.shape)


def parse_safetensors_header(first8: bytes | memoryview, read_header: Callable[[int], bytes | memoryview],
                             total_len: int, what: str) -> tuple[list[tuple[str, torch.dtype, list[int], int, int]], int]:
    """Parses and checks a safetensors header (dtype known, offsets inside the data, sizes matching shapes).

    Args:
        first8: The blob's first 8 bytes (the header length).
        read_header: Returns the ``n``-byte JSON header that follows them.
        total_len: The blob's (file's) length in bytes.
        what: Names the input in error messages.

    Returns:
        ``([(name, dtype, shape, start, end), ...], data_start)``; offsets are relative to
        ``data_start``, the byte where the data section begins.

    Raises:
        ValueError: Not a safetensors blob, or an inconsistent header.
    """
    if total_len < 8 or len(first8) < 8:
        raise ValueError(f"{what}: payload too short for safetensors")
    (header_len,) = struct.unpack("<Q", first8[:8])
    if header_len > total_len - 8 or header_len < 2:
        raise ValueError(
            f"{what}: not a safetensors blob (header length {header_len} does not fit a {total_len}-byte "
            "payload); the CPU server does not accept SGLang's pickled (MultiprocessingSerializer) "
            "tensors, send safetensors bytes"
        )
    raw = bytes(read_header(header_len))
    if raw[:1] != b"{":
        raise ValueError(
            f"{what}: not a safetensors blob; the CPU server does not accept "
            "SGLang's pickled (MultiprocessingSerializer) tensors, send safetensors bytes"
        )
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{what}: bad safetensors header (the header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{what}: bad safetensors header (not a JSON object)")
    base = 8 + header_len
    data_len = total_len - base
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, start, end = _header_entry(name, info, what)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end <= data_len or end - start != math.prod(shape) * itemsize:
            raise ValueError(f"{what}: tensor {name!r} has offsets {start}..{end}, inconsistent with "
                             f"shape {shape} {info['dtype']} and a {data_len}-byte data section "
                             "(it does not match its shape or the file size)")
        entries.append((name, dtype, shape, start, end))
    return entries, base


def _header_entry(name: str, info: object, what: str) -> tuple[torch.dtype, list[int], int, int]:
    """``(dtype, shape, start, end)`` of one header entry, each field checked by name."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"{what}: bad safetensors header entry for {name!r}: {problem}")

    if not isinstance(info, dict):
        raise bad(f"expected an object, got {type(info).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise bad(f"no {key!r}")
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {info['dtype']!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    return SAFETENSORS_DTYPES[info["dtype"]], shape, offsets[0], offsets[1]
