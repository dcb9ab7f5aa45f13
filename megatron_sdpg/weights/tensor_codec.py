"""Encodes named tensors for ``/update_weights_from_tensor``.

SGLang's ``serialized_named_tensors`` is a list with one entry per engine TP
rank; each entry is base64 of ``MultiprocessingSerializer.serialize(list of
(name, tensor))``, i.e. torch's ``ForkingPickler``. For CUDA tensors that pickle
carries CUDA IPC handles, so it only works between processes on the same node
(the colocated trainer/engine setup); ``encode_sglang`` produces it.

Our CPU server does not unpickle HTTP input (unpickling runs arbitrary code and
ForkingPickler moves CPU storages through file descriptors that HTTP cannot
carry). It takes the same field and list layout, each entry base64 of a
safetensors blob holding the bucket's tensors (``encode_safetensors``), and -- the
fast path ``TensorPushSync`` uses -- the bare safetensors bytes as an
``application/octet-stream`` body, streamed from the tensors' memory
(``safetensors_stream.SafetensorsStream``), which skips base64 and JSON. The
server reads such a blob with ``decode_safetensors_blob``: tensors are zero-copy
views of the received buffer.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
import warnings
from typing import Callable, Iterable

import torch

# safetensors dtype strings (the format's spec) -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def safetensors_blob(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """One safetensors blob holding the given tensors (joined from ``SafetensorsStream``'s pieces).

    Raises:
        ValueError: A name appears twice.
    """
    from megatron_sdpg.weights.safetensors_stream import SafetensorsStream

    return b"".join(SafetensorsStream(named).pieces())


def encode_safetensors(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """Base64 (ASCII bytes) of ``safetensors_blob(named)`` (the JSON-field form)."""
    return base64.b64encode(safetensors_blob(named))


def decode_safetensors_blob(blob: bytes | bytearray | memoryview, what: str = "body") -> list[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors blob as zero-copy views of ``blob`` (keep it alive while they are used).

    The library's ``load`` copies every tensor out of the blob; the server only reads
    them once into its parameters, so views save one full copy. The header is
    checked against the format (dtype known, offsets inside the blob, sizes matching
    the shapes) before any view is made.

    Args:
        blob: The bytes (``bytearray`` gives writable views, ``bytes`` read-only ones).
        what: Names the input in error messages.

    Raises:
        ValueError: Not a safetensors blob, or an inconsistent header.
    """
    mv = memoryview(blob).cast("B")
    entries, base = parse_safetensors_header(mv[:8], lambda n: mv[8 : 8 + n], len(mv), what)
    out = []
    with warnings.catch_warnings():  # views of read-only bytes: the server only reads them
        warnings.simplefilter("ignore", UserWarning)
        for name, dtype, shape, start, end in entries:
            if start == end:
                t = torch.empty(shape, dtype=dtype)
            else:
                t = torch.frombuffer(mv, dtype=torch.uint8, offset=base + start, count=end - start)
                t = t.view(dtype).view(shape)
            out.append((name, t))
    return out


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


def decode_safetensors(payload: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """Inverse of ``encode_safetensors``.

    Raises:
        ValueError: The payload is not base64 of a safetensors blob (e.g. a pickle).
    """
    try:
        # binascii's strict mode validates in C; b64decode(validate=True) runs a slow regex first.
        blob = binascii.a2b_base64(payload, strict_mode=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"serialized_named_tensors: not valid base64 ({e})") from None
    return decode_safetensors_blob(blob, "serialized_named_tensors")


def encode_sglang(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """SGLang's format: base64 (ASCII bytes) of ``ForkingPickler`` of ``[(name, tensor), ...]``.

    For real SGLang engines on the same node as the trainer (CUDA IPC handles).
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump([(name, t.detach()) for name, t in named])
    return base64.b64encode(buf.getvalue())
