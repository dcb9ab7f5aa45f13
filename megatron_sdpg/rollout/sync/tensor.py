"""``TensorPushSync``: buckets of named tensors through ``/update_weights_from_tensor``.

Each bucket (``bucket_bytes`` at most) is encoded and POSTed to every engine;
the next bucket is encoded while the previous one is in flight. Encodings
(see ``tensor_codec``): ``safetensors`` for our CPU server -- the bucket's
safetensors serialisation as a raw ``application/octet-stream`` body, options in
the query string (no base64, no JSON; a documented deviation from SGLang's JSON
body), streamed from the tensors' own memory (``SafetensorsStream``: the header,
then the tensor bytes; no serialised copy, so the tensors must stay unchanged
until the sync returns) --
and ``sglang`` (SGLang's JSON body: ``serialized_named_tensors`` with a base64
ForkingPickler payload, one copy per TP rank) for real SGLang engines on the
trainer's node. After the last bucket, ``/update_weight_version`` (without aborting
requests) sets the version and ``/flush_cache`` drops cached prefixes.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Iterable

import torch

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.protocol import RequestRejectedError, StreamedBody
from megatron_sdpg.rollout.sync.base import ProbeCheck, WeightSync, WeightSyncError, iter_buckets, tensor_bytes
from megatron_sdpg.formats.safetensors_stream import SafetensorsStream
from megatron_sdpg.formats.tensor_codec import encode_sglang

ENCODINGS = ("safetensors", "sglang")
_TENSOR_ROUTE = "/update_weights_from_tensor"


class TensorPushSync(WeightSync):
    """Bucketed tensor push.

    Args:
        client: Reaches every engine.
        bucket_bytes: Largest bucket.
        encoding: ``safetensors`` (CPU server) or ``sglang``.
        tp_size: Entries in ``serialized_named_tensors`` (one per engine TP rank).
        probe: Optional post-sync log-prob check.
        timeout_s: Timeout of each bucket's call.
    """

    name = "tensor"

    def __init__(self, client: RolloutClient, bucket_bytes: int = 512 * 2**20, encoding: str = "safetensors",
                 tp_size: int = 1, probe: ProbeCheck | None = None, timeout_s: float = 600.0):
        super().__init__(client, probe)
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding: must be one of {list(ENCODINGS)}, got {encoding!r}")
        self.bucket_bytes = bucket_bytes
        self.encoding = encoding
        self.tp_size = tp_size
        self.timeout_s = timeout_s

    def _push(self, named: Iterable[tuple[str, torch.Tensor]], version: str) -> dict[str, float]:
        nbytes = 0
        buckets = 0
        in_flight = None
        for bucket in iter_buckets(named, self.bucket_bytes):
            path, body = self.request(bucket)  # encoding overlaps with the previous bucket's upload
            if in_flight is not None:
                self._wait(in_flight)
            in_flight = self._send(path, body)
            nbytes += sum(tensor_bytes(t) for _, t in bucket)
            buckets += 1
        if in_flight is not None:
            self._wait(in_flight)
        self._wait(self._send("/update_weight_version", {"new_version": version, "abort_all_requests": False}))
        self.client.run(self.client.aclient.flush_cache())
        return {"sync/bytes": float(nbytes), "sync/buckets": float(buckets)}

    def request(self, bucket: list[tuple[str, torch.Tensor]]) -> tuple[str, bytes | StreamedBody]:
        """The route and body that deliver one bucket."""
        if self.encoding == "safetensors":
            stream = SafetensorsStream(bucket)
            return (_TENSOR_ROUTE + "?flush_cache=false&abort_all_requests=false",
                    StreamedBody(stream.nbytes, stream.pieces))
        return _TENSOR_ROUTE, self.request_body(encode_sglang(bucket))

    def request_body(self, payload: bytes) -> bytes:
        """SGLang's JSON body, assembled around the base64 payload (which needs no escaping)
        instead of serialising a string of hundreds of MB with ``json.dumps``."""
        fields = json.dumps({"load_format": None, "flush_cache": False, "abort_all_requests": False})
        entries = b",".join([b'"' + payload + b'"'] * self.tp_size)
        return fields[:-1].encode() + b', "serialized_named_tensors": [' + entries + b"]}"

    def _send(self, path: str, body: dict | bytes | StreamedBody) -> concurrent.futures.Future:
        return self.client.submit(self.client.aclient.post_all(path, body, self.timeout_s))

    def _wait(self, fut) -> None:
        try:
            fut.result()
        except RequestRejectedError as e:
            raise WeightSyncError(f"tensor sync: an engine refused a bucket: {e}") from None
