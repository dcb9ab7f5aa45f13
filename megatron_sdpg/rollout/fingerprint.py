"""A short fingerprint of an HF safetensors checkpoint on disk.

The CPU server reports the fingerprint of the checkpoint it loaded in
``/model_info`` (``weight_fingerprint``; null once other weights were pushed), and
the launcher compares it with the fingerprint of ``rollout.model_path`` before
using an engine, so an engine serving other weights is refused at start.

The digest covers every file's name, size and safetensors header (names, dtypes,
shapes, offsets) and its data: all of it up to 64 MiB a file, else 256 blocks of
64 KiB spread evenly over the file (bounded time on large checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

_FULL_LIMIT = 64 * 2**20
_BLOCKS, _BLOCK = 256, 64 * 2**10


def safetensors_files(path: str) -> list[str]:
    """The ``*.safetensors`` files of an HF checkpoint directory (single file or sharded with an index).

    Raises:
        FileNotFoundError: ``path`` is not a directory or has no ``*.safetensors`` file.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model_path: {path} is not a directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"model_path: no .safetensors files in {path}")
    return [os.path.join(path, name) for name in files]


def checkpoint_fingerprint(path: str) -> str:
    """Hex digest of the checkpoint at ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: No checkpoint at ``path``.
    """
    h = hashlib.blake2b(digest_size=16)
    for file in safetensors_files(path):
        size = os.path.getsize(file)
        h.update(f"{os.path.basename(file)}\0{size}\0".encode())
        with open(file, "rb") as f:
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(head + f.read(min(header_len, size)))
            start = f.tell()
            if size - start <= _FULL_LIMIT:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            else:
                step = (size - start - _BLOCK) // (_BLOCKS - 1)
                for i in range(_BLOCKS):
                    f.seek(start + i * step)
                    h.update(f.read(_BLOCK))
    return h.hexdigest()
