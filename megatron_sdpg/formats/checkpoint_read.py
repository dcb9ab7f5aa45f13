"""Reading ``torch_dist`` checkpoints with one copy per byte: straight from the file into the parameters.

PyTorch's ``FileSystemReader`` turns every stored item into a fresh tensor with
``torch.load`` (a read into newly allocated memory) and then copies that into the
destination: two passes over the data plus the page faults of a model-sized
temporary. :class:`DirectFileSystemReader` first loads each item's tensor header
only (``map_location="meta"``, which also gives the byte offset of its data inside
the item) and, when the wanted bytes are one dense run of the stored tensor (all
of it, or e.g. a TP split along its rows) and the destination is contiguous, ``readinto``\\ s the bytes directly into the destination.
Any other item (objects, partial reads, strided or transformed data) goes through
the stock path. :func:`direct_load_strategy` is megatron's ``torch_dist`` load
strategy with this reader.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

from megatron_sdpg.formats.safetensors_format import byte_view


class DirectFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` that reads whole dense tensors straight into their destination."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        fallback = []
        by_file: dict[str, list] = {}
        for req in plan.items:
            by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in by_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    if not self._read_direct(stream, req, planner):
                        fallback.append(req)
        if fallback:
            return super().read_data(LoadPlan(fallback, plan.storage_data, plan.planner_data), planner)
        from torch.futures import Future

        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_direct(self, stream, req, planner: LoadPlanner) -> bool:
        """Reads ``req`` into its destination if its bytes are one dense run; False to fall back.

        That is a whole stored tensor or any box of it that is contiguous in
        memory: size-1 leading dims, then one dim with any range, then full dims
        (e.g. a TP split along the rows of a layer's ``[1, rows, cols]`` slot).
        """
        info = self.storage_data[req.storage_index]
        if req.type == LoadItemType.BYTE_IO:
            return False
        stored = stored_tensor(stream, info)
        if stored is None:
            return False
        header, offset = stored
        target = planner.resolve_tensor(req).detach()
        shape, lengths, starts = tuple(header.shape), tuple(req.lengths), tuple(req.storage_offsets)
        if (header.dtype != target.dtype or tuple(target.shape) != lengths or len(shape) != len(lengths)
                or any(s + n > d for s, n, d in zip(starts, lengths, shape))
                or not target.is_contiguous() or target.device.type != "cpu"):
            return False
        k = next((i for i, n in enumerate(lengths) if n != 1), len(lengths) - 1)
        if any(starts[j] != 0 or lengths[j] != shape[j] for j in range(k + 1, len(shape))):
            return False
        item = header.element_size()
        start = offset + sum(s * st for s, st in zip(starts, header.stride())) * item
        nbytes = target.numel() * item
        if nbytes:
            stream.seek(info.offset + start)
            got = stream.readinto(byte_view(target))
            if got != nbytes:
                raise RuntimeError(f"{req.storage_index.fqn}: read {got} of {nbytes} bytes (truncated checkpoint file?)")
        planner.commit_tensor(req, target)
        return True


def stored_tensor(stream, info) -> tuple[torch.Tensor, int] | None:
    """Where a stored tensor item's bytes are: ``(meta tensor, data offset within the item)``.

    Reads only the item's ``torch.save`` header (``map_location="meta"``). None for
    an item whose data is not one dense run of plain bytes (transformed, a view of a
    larger storage, or torch without the private ``_checkpoint_offset``).

    Args:
        stream: The open checkpoint file (binary, seekable).
        info: The item's ``_StorageInfo`` (file offset and length).
    """
    from torch.distributed.checkpoint.filesystem import _create_file_view

    if info.transform_descriptors:
        return None
    header = torch.load(_create_file_view(stream, info.offset, info.length), map_location="meta", weights_only=True)
    if not isinstance(header, torch.Tensor):
        return None
    offset = getattr(header.untyped_storage(), "_checkpoint_offset", None)
    nbytes = header.numel() * header.element_size()
    if (offset is None or header.storage_offset() != 0 or not header.is_contiguous()
            or header.untyped_storage().nbytes() != nbytes or offset + nbytes > info.length):
        return None
    return header, offset


def direct_load_strategy():
    """megatron's ``torch_dist`` load strategy, reading through :class:`DirectFileSystemReader`."""
    from torch.distributed import checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    class _DirectLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            original = sharded_state_dict
            state, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict)
            pyt_state = mcore_torch.mcore_to_pyt_state_dict(state, True)
            reader = DirectFileSystemReader(str(checkpoint_dir))
            dcp.load(pyt_state, storage_reader=reader, planner=mcore_torch.MCoreLoadPlanner(
                shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
                allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch}))
            self.cached_global_metadata = reader.read_metadata()
            loaded = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state.items()}
            loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
            mcore_torch._restore_dict_types(loaded, original)
            return loaded

    return _DirectLoadStrategy()
