"""Safetensors written from the tensors' own memory: the header, then each tensor's bytes.

Usage::

    stream = SafetensorsStream(named)                 # builds the header only; no tensor is copied
    stream.write_file("model.safetensors")            # disk sync: one write per tensor
    body = StreamedBody(stream.nbytes, stream.pieces)  # tensor push: HTTP body in pieces

``safetensors.torch.save``/``save_file`` first assemble the whole blob in a new
buffer (and ``save`` then copies it into a Python ``bytes``). For weight sync that
is one or two extra passes over freshly allocated memory per bucket, which on a
VM costs more than the transport itself. The format is small and documented
(https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header length, a JSON header mapping each name to ``dtype``, ``shape`` and
``data_offsets`` (relative to the data section), then the data section. The
bytes produced here load with the library's ``load``/``safe_open`` and with
``tensor_codec.decode_safetensors_blob``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from megatron_sdpg.formats.safetensors_format import DTYPE_NAMES, TensorEntry, byte_view, encode_header

PIECE_BYTES = 4 * 2**20  # pieces of an HTTP body: big enough for few syscalls, small enough to keep buffers hot


class SafetensorsStream:
    """The safetensors serialisation of named tensors, described rather than assembled.

    Tensors are laid out largest element size first (so every tensor starts at an
    offset aligned to its element size; the header is space-padded to 8 bytes, as
    the library does), in the given order otherwise. Tensors sharing storage (tied
    weights) are fine: each entry's bytes are written from its own memory.

    Args:
        named: ``(name, tensor)`` pairs; tensors are moved to CPU and made contiguous
            (no copy when they already are). The tensors must not change until the
            stream has been written.

    Attributes:
        header: The 8-byte length and the padded JSON header.
        tensors: ``(name, tensor)`` in file order (CPU, contiguous).
        nbytes: Length of the whole serialisation (header included).

    Raises:
        ValueError: A name appears twice, or a dtype safetensors cannot store.
    """

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]]):
        tensors: dict[str, torch.Tensor] = {}
        for name, t in named:
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            t = t.detach().to("cpu").contiguous()
            if t.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
            tensors[name] = t
        order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: ties keep their order
        self.tensors = [(k, tensors[k]) for k in order]
        self.header, placed = encode_header([TensorEntry(k, tuple(t.shape), t.dtype) for k, t in self.tensors])
        self.nbytes = len(self.header) + (placed[-1].end if placed else 0)

    def pieces(self, piece_bytes: int = PIECE_BYTES) -> Iterator[memoryview | bytes]:
        """The serialisation in order: the header, then views of the tensors' memory of at
        most ``piece_bytes`` each (nothing is copied)."""
        yield self.header
        for _, t in self.tensors:
            if not t.numel():
                continue
            view = byte_view(t)
            for start in range(0, len(view), piece_bytes):
                yield view[start : start + piece_bytes]

    def write_file(self, path: str) -> None:
        """Writes the serialisation to ``path`` (created or truncated): one unbuffered write
        per tensor straight from its memory. Does not fsync; the caller decides when."""
        with open(path, "wb", buffering=0) as f:
            for piece in self.pieces(piece_bytes=2**62):
                view = memoryview(piece)
                while view:  # raw writes may be short
                    view = view[f.write(view):]
