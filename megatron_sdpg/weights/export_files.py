"""Megatron parameters -> a sharded HF safetensors directory, written by the ranks that hold them.

The offline export (``tools/convert_megatron_to_hf.py``). Unlike
:func:`~megatron_sdpg.weights.export.export_hf_weights`, which funnels every
tensor to global rank 0 (what a rollout engine needs), here each rank writes the
tensors of its own pipeline stage into its own shard files, in parallel:

1. Plan. Every rank lists the HF tensors it will write (name, shape, dtype) from
   the mapping alone; within a stage the parameters are dealt round-robin over
   the TP ranks, so all TP ranks write. One ``all_gather_object`` gives every rank
   the whole plan: shards of at most ``max_shard_bytes`` per writer, numbered
   ``model-0000i-of-0000n.safetensors`` in rank order, and the index.
2. Write. Each parameter is gathered over its TP group onto its writer (no
   collective at all without TP, and no pipeline traffic) or, in the offline
   converter, read whole from the checkpoint files by its writer, split into its HF
   tensors and streamed into the writer's current shard with
   :class:`~megatron_sdpg.formats.safetensors_format.StreamingSafetensorsWriter`,
   straight from the tensor's memory. A rank holds at most one full parameter
   beyond its own shards at any time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.models.init import global_named_parameters
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.weights import WeightMappingError, mapping_for
from megatron_sdpg.formats.hf_io import INDEX_FILE
from megatron_sdpg.weights.mapping_base import tp_attrs, unshard
from megatron_sdpg.formats.safetensors_format import StreamingSafetensorsWriter, TensorEntry


def _exported_params(chunks: list, mapping) -> list[tuple[str, torch.Tensor]]:
    """``(Megatron global name, parameter)`` of every parameter HF stores, in model order."""
    out = []
    for gname, p in global_named_parameters(chunks):
        mapping.rule(gname)  # fail early on a parameter with no HF counterpart
        if mapping.exports(gname):
            out.append((gname, p))
    return out


def plan_shards(per_rank: list[list[TensorEntry]], max_shard_bytes: int) -> list[tuple[int, list[TensorEntry]]]:
    """Splits each writer's tensors into shards; returns ``(rank, entries)`` per shard in file order.

    A shard is closed before it would exceed ``max_shard_bytes``; a larger tensor
    gets a shard of its own.
    """
    shards: list[tuple[int, list[TensorEntry]]] = []
    for rank, entries in enumerate(per_rank):
        size, current = 0, None
        for e in entries:
            if current is None or (current and size + e.nbytes > max_shard_bytes):
                current, size = [], 0
                shards.append((rank, current))
            current.append(e)
            size += e.nbytes
    return shards


def shard_file_name(i: int, n: int) -> str:
    """``transformers``' name of shard ``i`` (0-based) of ``n``."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _check_plan(mapping, per_rank: list[list[TensorEntry]]) -> None:
    seen: dict[str, int] = {}
    for rank, entries in enumerate(per_rank):
        for e in entries:
            if e.name in seen:
                raise WeightMappingError(f"HF tensor {e.name!r} is produced by ranks {seen[e.name]} and {rank}")
            seen[e.name] = rank
    mapping.check_hf_names(seen)


@torch.no_grad()
def write_hf_safetensors(chunks: list, model_cfg: ModelConfig, groups: ParallelGroups, out_dir: str,
                         dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30, progress: bool = False,
                         values: Callable[[str, torch.Tensor], list[tuple[int, torch.Tensor]]] | None = None) -> list[str]:
    """Writes the model as sharded HF safetensors plus the index into ``out_dir`` (a collective).

    Every rank of the world calls it; data-parallel replicas > 0 only join the plan.

    Args:
        chunks: This rank's bare ``GPTModel`` chunks.
        model_cfg: The architecture.
        groups: Process groups of this rank.
        out_dir: An existing directory, the same path on every rank (a shared file system).
        dtype: Dtype of the written tensors.
        max_shard_bytes: Size limit of one shard file (a larger tensor gets its own).
        progress: A tqdm bar on global rank 0.
        values: Where each parameter's data comes from instead of its memory:
            ``values(global name, param)`` returns the whole (unsharded) parameter
            as ``(first row, tensor)`` blocks, on the rank that writes it only, so
            no TP gather is needed (e.g.
            :meth:`~megatron_sdpg.weights.checkpoint_source.CheckpointParamSource.full_blocks`).

    Returns:
        Every shard file name (on every rank).

    Raises:
        WeightMappingError: the parameters do not make up exactly the HF tensors of the
            architecture (naming the tensor).
    """
    mapping = mapping_for(model_cfg)
    params = _exported_params(chunks, mapping) if groups.dp_rank == 0 else []
    tp, tp_rank = groups.layout.tp, groups.tp_rank
    mine = [(i, g, p) for i, (g, p) in enumerate(params) if i % tp == tp_rank]
    plan = [TensorEntry(n, mapping.hf_shapes[n], dtype) for _, g, _ in mine for n in mapping.rule(g).hf_names]
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, plan)
    _check_plan(mapping, per_rank)
    shards = plan_shards(per_rank, max_shard_bytes)
    names = [shard_file_name(i, len(shards)) for i in range(len(shards))]
    my_files = [(os.path.join(out_dir, names[i]), entries) for i, (r, entries) in enumerate(shards)
                if r == dist.get_rank()]
    from tqdm import tqdm

    bar = tqdm(total=len(params), desc="export HF", unit="tensor", leave=False,
               disable=not (progress and dist.get_rank() == 0))
    writer = None
    files = iter(my_files)
    try:
        for hf_name, pieces in _full_hf_tensors(params, mapping, groups, bar, values):
            if writer is None or writer.done:
                if writer is not None:
                    writer.close()
                writer = StreamingSafetensorsWriter(*next(files))
            writer.write_rows(hf_name, [p.to(dtype) for p in pieces])
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if dist.get_rank() == 0:
        weight_map = {e.name: names[i] for i, (_, entries) in enumerate(shards) for e in entries}
        index = {"metadata": {"total_size": sum(e.nbytes for _, es in shards for e in es)},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return names


def _full_hf_tensors(params: list[tuple[str, torch.Tensor]], mapping, groups: ParallelGroups,
                     bar, values=None) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """This rank's HF tensors (as row pieces) in plan order; TP-split parameters are gathered onto (or read
    whole by) their writer."""
    tp, tp_rank = groups.layout.tp, groups.tp_rank
    for i, (gname, p) in enumerate(params):
        owner = i % tp
        is_tp, dim, stride = tp_attrs(p)
        if values is not None:
            blocks = values(gname, p) if owner == tp_rank else []
        elif is_tp and tp > 1:
            blocks = [(0, _gather_to(p.detach().contiguous(), owner, tp, tp_rank, dim, stride, groups))]
        else:
            blocks = [(0, p.detach())]
        if owner == tp_rank:
            yield from mapping.to_hf_blocks(gname, [(r, b.cpu()) for r, b in blocks])
        bar.update(1)


def _gather_to(local: torch.Tensor, owner: int, tp: int, tp_rank: int, dim: int, stride: int,
               groups: ParallelGroups) -> torch.Tensor | None:
    """The full parameter on TP rank ``owner`` (None elsewhere)."""
    dst = dist.get_global_rank(groups.tp, owner)
    if tp_rank != owner:
        dist.gather(local, None, dst=dst, group=groups.tp)
        return None
    if dim == 0 and stride == 1:  # gather straight into the rows of the full tensor
        full = local.new_empty((local.shape[0] * tp, *local.shape[1:]))
        dist.gather(local, list(full.chunk(tp)), dst=dst, group=groups.tp)
        return full
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.gather(local, pieces, dst=dst, group=groups.tp)
    return unshard(pieces, dim, stride)
