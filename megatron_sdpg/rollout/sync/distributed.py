"""``NcclBroadcastSync``: SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed`` flow.

The trainer (rank 0 of a separate weight-update group) and every engine rank
(``rank_offset + tp_rank``) rendezvous once (``connect``). Per bucket, the
trainer POSTs names/dtypes/shapes to every engine and, while those calls wait
on the engines, broadcasts the bucket's tensors one by one in the same order
(the engines' receive loop); then it waits for the engines' answers. Only one
trainer process (holding the full, unsharded HF tensors) takes part.

The backend is NCCL against real SGLang (tensors must live on the trainer's
GPU), gloo against our CPU server, where the whole flow runs in tests.
"""

from __future__ import annotations

import concurrent.futures
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.protocol import RolloutError
from megatron_sdpg.rollout.process_group import destroy_weight_update_group, init_weight_update_group
from megatron_sdpg.rollout.sync.base import ProbeCheck, WeightSync, WeightSyncError, dtype_name, iter_buckets, tensor_bytes


class NcclBroadcastSync(WeightSync):
    """Broadcast through a process group shared with the engines.

    Args:
        client: Reaches every engine (engine i has ``engine_tp_sizes[i]`` ranks).
        master_address: Address the engines reach the trainer at.
        master_port: Free port for the group's rendezvous store (hosted by the trainer).
        backend: ``nccl`` (SGLang) or ``gloo`` (CPU server).
        engine_tp_sizes: TP size of each engine (default 1 each).
        bucket_bytes: Largest bucket per ``/update_weights_from_distributed`` call.
        group_name: The group's name on every rank.
        probe: Optional post-sync log-prob check.
        timeout_s: Rendezvous, broadcast and HTTP timeout.
    """

    name = "distributed"

    def __init__(self, client: RolloutClient, master_address: str, master_port: int, backend: str = "nccl",
                 engine_tp_sizes: Sequence[int] | None = None, bucket_bytes: int = 512 * 2**20,
                 group_name: str = "weight_update_group", probe: ProbeCheck | None = None, timeout_s: float = 600.0):
        super().__init__(client, probe)
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.tp_sizes = list(engine_tp_sizes or [1] * len(client.urls))
        if len(self.tp_sizes) != len(client.urls):
            raise ValueError(f"engine_tp_sizes: {len(self.tp_sizes)} sizes for {len(client.urls)} engines")
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.timeout_s = timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.group: dist.ProcessGroup | None = None

    def connect(self) -> None:
        """Forms the group: every engine joins over HTTP while the trainer joins as rank 0."""
        if self.group is not None:
            return
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.tp_sizes))]
        calls = [
            self.client.submit(self.client.aclient.call(url, "POST", "/init_weights_update_group", {
                "master_address": self.master_address, "master_port": self.master_port, "rank_offset": off,
                "world_size": world, "group_name": self.group_name, "backend": self.backend,
            }, timeout_s=self.timeout_s))
            for url, off in zip(self.client.urls, offsets)
        ]
        try:
            self.group = init_weight_update_group(self.master_address, self.master_port, 0, world,
                                                  self.group_name, self.backend, self.timeout_s)
        except Exception as e:
            raise WeightSyncError(f"distributed sync: joining the weight-update group failed: {e}; "
                                  f"engine answers: {self._answers(calls, wait=False)}") from None
        self._wait(calls, "/init_weights_update_group")

    def close(self) -> None:
        """Engines leave the group, then the trainer tears it down."""
        if self.group is None:
            return
        try:
            self._wait([self.client.submit(self.client.aclient.call(
                u, "POST", "/destroy_weights_update_group", {"group_name": self.group_name}, timeout_s=60.0))
                for u in self.client.urls], "/destroy_weights_update_group")
        finally:
            destroy_weight_update_group(self.group)
            self.group = None

    def _push(self, named: Iterable[tuple[str, torch.Tensor]], version: str) -> dict[str, float]:
        self.connect()
        nbytes = 0
        buckets = 0
        for bucket in iter_buckets(named, self.bucket_bytes):
            tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
            body = {
                "names": [n for n, _ in bucket],
                "dtypes": [dtype_name(t.dtype) for t in tensors],
                "shapes": [list(t.shape) for t in tensors],
                "group_name": self.group_name, "flush_cache": False, "abort_all_requests": False,
            }
            calls = [self.client.submit(self.client.aclient.call(
                u, "POST", "/update_weights_from_distributed", body, timeout_s=self.timeout_s)) for u in self.client.urls]
            for t in tensors:
                dist.broadcast(t, src=0, group=self.group)
            self._wait(calls, "/update_weights_from_distributed")
            nbytes += sum(tensor_bytes(t) for t in tensors)
            buckets += 1
        self.post_all("/update_weight_version", {"new_version": version, "abort_all_requests": False})
        self.client.run(self.client.aclient.flush_cache())
        return {"sync/bytes": float(nbytes), "sync/buckets": float(buckets)}

    def _answers(self, calls: list[concurrent.futures.Future], wait: bool) -> list[str]:
        out = []
        for url, c in zip(self.client.urls, calls):
            if not wait and not c.done():
                out.append(f"{url}: pending")
                continue
            try:
                c.result(self.timeout_s)
                out.append(f"{url}: ok")
            except (RolloutError, concurrent.futures.TimeoutError) as e:
                out.append(f"{url}: {e}")
        return out

    def _wait(self, calls: list[concurrent.futures.Future], path: str) -> None:
        answers = self._answers(calls, wait=True)
        bad = [a for a in answers if not a.endswith(": ok")]
        if bad:
            raise WeightSyncError(f"distributed sync: {path} failed: {'; '.join(bad)}")
