"""Megatron parameters -> full HF tensors, streamed in buckets (training-time weight export).

Who does what
-------------
Every rank calls :func:`export_hf_weights` and iterates the returned generator
to the end. Ranks of data-parallel replica 0 take part in the collectives
(replicas > 0 hold the same weights and return at once). Full tensors are
yielded on **global rank 0** only (data-parallel 0, pipeline stage 0, TP rank 0);
every other rank's generator yields nothing.

Per bucket of at most ``bucket_bytes`` of one stage's local shards: one
``all_gather`` over the TP group (on that stage), then one point-to-point send
from that stage's TP rank 0 to pipeline stage 0 (over the PP group). Tensors stay
on the parameters' device (CUDA on GPU: ready for an NCCL broadcast to a rollout
engine), are fresh copies (never views of parameters), and come in Megatron's
parameter order (embedding, layers in order, final norm, output layer).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.models.init import global_named_parameters
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.weights import mapping_for
from megatron_sdpg.weights.mapping_base import tp_attrs, unshard

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


@dataclass(frozen=True)
class _Entry:
    """One exported parameter as every rank of the pipeline sees it."""

    name: str  # Megatron global name
    shape: tuple[int, ...]  # local (TP-sharded) shape
    dtype: str
    is_tp: bool
    dim: int
    stride: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _local_entries(chunks: list, mapping) -> list[tuple[_Entry, torch.Tensor]]:
    out = []
    for gname, p in global_named_parameters(chunks):
        mapping.rule(gname)  # fail early on a parameter with no HF counterpart
        if mapping.exports(gname):
            is_tp, dim, stride = tp_attrs(p)
            out.append((_Entry(gname, tuple(p.shape), str(p.dtype), is_tp, dim, stride), p))
    return out


def _buckets(entries: list[_Entry], bucket_bytes: int) -> list[list[int]]:
    """Consecutive runs of entries with one dtype and at most ``bucket_bytes`` of local data."""
    buckets: list[list[int]] = []
    size = 0
    for i, e in enumerate(entries):
        nbytes = e.numel * _DTYPES[e.dtype].itemsize
        if not buckets or size + nbytes > bucket_bytes or entries[buckets[-1][0]].dtype != e.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


@torch.no_grad()
def export_hf_weights(chunks: list, model_cfg: ModelConfig, groups: ParallelGroups,
                      bucket_bytes: int = 512 * 2**20) -> Iterator[tuple[str, torch.Tensor]]:
    """Gathers this model's weights and yields them as full HF tensors on global rank 0.

    Args:
        chunks: This rank's bare ``GPTModel`` chunks.
        model_cfg: The architecture.
        groups: Process groups of this rank.
        bucket_bytes: Local bytes gathered per collective (a larger tensor is one bucket).

    Yields:
        ``(hf_name, tensor)`` with the HF shape (vocabulary unpadded), on global rank
        0 only; tied output weights are not yielded (HF stores only the embedding).
        Every rank must exhaust its generator: the collectives happen as it runs.
    """
    if groups.dp_rank != 0:
        return
    mapping = mapping_for(model_cfg)
    local = _local_entries(chunks, mapping)
    tp, pp = groups.layout.tp, groups.layout.pp
    per_stage = [[e for e, _ in local]]
    if pp > 1:
        per_stage = [None] * pp
        dist.all_gather_object(per_stage, [e for e, _ in local], group=groups.pp)
    params = [p for _, p in local]
    device = params[0].device if params else torch.device("cpu")
    receiver = groups.pp_rank == 0 and groups.tp_rank == 0
    for stage, entries in enumerate(per_stage):
        for bucket in _buckets(entries, bucket_bytes):
            dtype = _DTYPES[entries[bucket[0]].dtype]
            local_numel = sum(entries[i].numel for i in bucket)
            pieces = None
            if groups.pp_rank == stage:
                flat = torch.cat([params[i].detach().reshape(-1) for i in bucket])
                pieces = [flat]
                if tp > 1:
                    pieces = [torch.empty_like(flat) for _ in range(tp)]
                    dist.all_gather(pieces, flat, group=groups.tp)
                if stage != 0 and groups.tp_rank == 0:
                    dist.send(torch.cat(pieces), dst=dist.get_global_rank(groups.pp, 0), group=groups.pp)
            elif stage != 0 and receiver:
                buf = torch.empty(tp * local_numel, dtype=dtype, device=device)
                dist.recv(buf, src=dist.get_global_rank(groups.pp, stage), group=groups.pp)
                pieces = list(buf.chunk(tp))
            if receiver:
                yield from _unpack(mapping, [entries[i] for i in bucket], pieces)


def _unpack(mapping, entries: list[_Entry], pieces: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Splits gathered flat buckets back into full Megatron tensors, then into HF tensors."""
    bucket_storages = {p.untyped_storage().data_ptr() for p in pieces}
    offset = 0
    for e in entries:
        parts = [p[offset: offset + e.numel].view(e.shape) for p in pieces]
        offset += e.numel
        full = unshard(parts, e.dim, e.stride) if e.is_tp else parts[0]
        for hf_name, tensor in mapping.to_hf(e.name, full):
            # A view of the bucket would keep the whole bucket alive: copy it out.
            shares_bucket = tensor.untyped_storage().data_ptr() in bucket_storages
            yield hf_name, tensor.clone() if shares_bucket else tensor
