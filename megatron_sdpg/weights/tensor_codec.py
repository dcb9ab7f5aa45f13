"""Encodes named tensors for ``/update_weights_from_tensor``.

SGLang's ``serialized_named_tensors`` is a list with one entry per engine TP
rank; each entry is base64 of ``MultiprocessingSerializer.serialize(list of
(name, tensor))``, i.e. torch's ``ForkingPickler``. For CUDA tensors that pickle
carries CUDA IPC handles, so it only works between processes on the same node
(the colocated trainer/engine setup); ``encode_sglang`` produces it.

Our CPU server does not unpickle HTTP input (unpickling runs arbitrary code and
ForkingPickler moves CPU storages through file descriptors that HTTP cannot
carry). It takes the same field and list layout, each entry base64 of a
safetensors blob holding the bucket's tensors (``encode_safetensors``). That is
the one deviation from SGLang's format.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
from typing import Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def encode_safetensors(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """Base64 (ASCII bytes) of one safetensors blob holding the given tensors (CPU copies)."""
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in named:
        if name in tensors:
            raise ValueError(f"tensor {name!r} appears twice in one bucket")
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    return base64.b64encode(st_save(tensors))


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
    if len(blob) < 10:
        raise ValueError("serialized_named_tensors: payload too short for safetensors")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if blob[8:9] != b"{" or header_len > len(blob) - 8:
        raise ValueError(
            "serialized_named_tensors: not a safetensors blob; the CPU server does not accept "
            "SGLang's pickled (MultiprocessingSerializer) tensors, send safetensors bytes"
        )
    try:
        json.loads(blob[8 : 8 + header_len])
        tensors = st_load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad payload
        raise ValueError(f"serialized_named_tensors: bad safetensors blob ({e})") from None
    return list(tensors.items())


def encode_sglang(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """SGLang's format: base64 (ASCII bytes) of ``ForkingPickler`` of ``[(name, tensor), ...]``.

    For real SGLang engines on the same node as the trainer (CUDA IPC handles).
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump([(name, t.detach()) for name, t in named])
    return base64.b64encode(buf.getvalue())
