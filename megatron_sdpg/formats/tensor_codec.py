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
import warnings
from typing import Iterable

import torch

from megatron_sdpg.formats.safetensors_format import parse_safetensors_header
from megatron_sdpg.formats.safetensors_stream import SafetensorsStream


def safetensors_blob(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """One safetensors blob holding the given tensors (joined from ``SafetensorsStream``'s pieces).

    Raises:
        ValueError: A name appears twice.
    """
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
