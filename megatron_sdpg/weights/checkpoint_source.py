"""Megatron parameter values read from a ``torch_dist`` checkpoint's files, without loading the model.

The Megatron -> HF export (``tools/convert_megatron_to_hf.py``) only passes bytes
from one file format to another. :class:`CheckpointParamSource` gives each
parameter of the (unfilled) model, whole (unsharded, so tensor-parallel ranks
need no gather), as row blocks taken from the checkpoint files: a block one
stored piece holds is a copy-on-write view of the file's pages; a block spread
over several stored pieces (a checkpoint saved at a larger TP than it is read
at) is assembled from them. The export writes the HF tensors from those views,
so the parameters are never filled and the conversion touches about half the
memory pages that loading the model first would.

The stored items are located with megatron's sharded state dict of the model
(key, global offset and local shape of every parameter piece, without reading
data) and PyTorch-Distributed's checkpoint metadata. Construction checks that
every exported parameter is fully covered; when a checkpoint uses anything this
reader does not handle (transformed items, flattened optimizer-style ranges,
dtype changes, torch without ``_checkpoint_offset``) it raises
:class:`CheckpointSourceUnavailable` and the caller loads the model through
``dist_checkpointing`` instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from megatron_sdpg.models.init import full_shape, global_named_parameters
from megatron_sdpg.formats.checkpoint_read import stored_tensor
from megatron_sdpg.formats.safetensors_format import TensorEntry, tensor_view


class CheckpointSourceUnavailable(Exception):
    """The checkpoint (or this torch) needs the general ``dist_checkpointing`` load; the message says why."""


@dataclass(frozen=True)
class _Region:
    """Rows ``[row, row + shape[0])`` of a parameter = the box ``offsets + [0, sizes)`` of checkpoint tensor ``key``."""

    row: int
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    shape: tuple[int, ...]


class CheckpointTensors:
    """Boxes of the tensors of a ``torch_dist`` checkpoint, as views of its files where possible.

    Args:
        ckpt_dir: The checkpoint directory.

    Raises:
        CheckpointSourceUnavailable: the metadata cannot be read.
    """

    def __init__(self, ckpt_dir: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.ckpt_dir = ckpt_dir
        try:
            self.metadata = FileSystemReader(ckpt_dir).read_metadata()
        except Exception as err:  # noqa: BLE001 - any failure means "use the general loader"
            raise CheckpointSourceUnavailable(f"cannot read the checkpoint metadata: {err}") from err
        self._located: dict[tuple[str, tuple[int, ...]], tuple[str, int, torch.Tensor]] = {}

    def pieces_covering(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype) -> list:
        """The stored pieces (metadata chunks) of ``key`` overlapping the box; checks they cover it exactly once.

        Raises:
            CheckpointSourceUnavailable: no such tensor, another dtype or shape, or a gap.
        """
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointSourceUnavailable(f"no tensor {key!r} in the checkpoint")
        if md.properties.dtype != dtype:
            raise CheckpointSourceUnavailable(f"{key!r} is stored as {md.properties.dtype}, the model has {dtype}")
        if len(md.size) != len(offsets) or any(o + s > d for o, s, d in zip(offsets, sizes, md.size)):
            raise CheckpointSourceUnavailable(f"{key!r} is stored as {tuple(md.size)}, the model reads "
                                              f"{tuple(sizes)} at {tuple(offsets)}")
        hits, covered = [], 0
        for c in md.chunks:
            box = _intersection(offsets, sizes, tuple(c.offsets), tuple(c.sizes))
            if box is not None:
                hits.append(c)
                covered += math.prod(hi - lo for lo, hi in box)
        if covered != math.prod(sizes):
            raise CheckpointSourceUnavailable(f"the stored pieces of {key!r} do not cover {tuple(sizes)} at {offsets}")
        return hits

    def box(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The box ``offsets + [0, sizes)`` of tensor ``key``: a view of the file when one stored chunk holds it."""
        hits = self.pieces_covering(key, offsets, sizes, dtype)
        if len(hits) == 1:
            return self._chunk(key, hits[0])[_slices(offsets, sizes, tuple(hits[0].offsets))]
        out = torch.empty(sizes, dtype=dtype)
        for c in hits:
            inter = _intersection(offsets, sizes, tuple(c.offsets), tuple(c.sizes))
            src = self._chunk(key, c)[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, c.offsets))]
            out[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, offsets))].copy_(src)
        return out

    def box_rows(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype,
                 axis: int) -> list[tuple[int, torch.Tensor]]:
        """The box as slabs along ``axis`` cut where stored pieces begin or end: ``(offset in the box, tensor)``.

        A slab one stored piece holds is a view of the file; the others (pieces split
        along another axis too) are assembled. So a box spread over TP pieces along
        ``axis`` costs no copy.
        """
        cuts = {offsets[axis], offsets[axis] + sizes[axis]}
        for c in self.pieces_covering(key, offsets, sizes, dtype):
            cuts.update(x for x in (c.offsets[axis], c.offsets[axis] + c.sizes[axis])
                        if offsets[axis] < x < offsets[axis] + sizes[axis])
        cuts = sorted(cuts)
        slabs = []
        for lo, hi in zip(cuts, cuts[1:]):
            o, z = list(offsets), list(sizes)
            o[axis], z[axis] = lo, hi - lo
            slabs.append((lo - offsets[axis], self.box(key, tuple(o), tuple(z), dtype)))
        return slabs

    def locate_all(self, key: str, chunks: list) -> None:
        """Reads the headers of the stored pieces ``chunks`` of ``key`` (no data), so a later :meth:`box` cannot fail."""
        for c in chunks:
            self._locate(key, c)

    def _locate(self, key: str, chunk) -> tuple[str, int, torch.Tensor]:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        where = (key, tuple(chunk.offsets))
        if where not in self._located:
            info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
            if info is None:
                raise CheckpointSourceUnavailable(f"{key!r}: a chunk at {tuple(chunk.offsets)} has no stored item")
            path = os.path.join(self.ckpt_dir, info.relative_path)
            with open(path, "rb") as f:
                stored = stored_tensor(f, info)
            if stored is None or tuple(stored[0].shape) != tuple(chunk.sizes):
                raise CheckpointSourceUnavailable(f"{key!r}: the item at {tuple(chunk.offsets)} is not a plain tensor")
            header, offset = stored
            self._located[where] = (path, info.offset + offset, header)
        return self._located[where]

    def _chunk(self, key: str, chunk) -> torch.Tensor:
        path, start, header = self._locate(key, chunk)
        nbytes = header.numel() * header.element_size()
        return tensor_view(path, start, TensorEntry(key, tuple(header.shape), header.dtype, 0, nbytes))


class CheckpointParamSource:
    """This rank's parameters, whole (unsharded), as row blocks read from a checkpoint, for the HF export.

    With tensor parallelism each TP rank can read any parameter in full straight
    from the files, so the export needs no gather: the rank that writes a
    parameter asks for all of it.

    Args:
        chunks: This rank's bare ``GPTModel`` chunks (their memory is not read).
        ckpt_dir: The ``torch_dist`` checkpoint.
        wanted: Which global parameter names will be asked for (others are not checked).
        tp: Tensor-parallel size of the layout the chunks were built at.
        tp_rank: This rank's TP index.

    Raises:
        CheckpointSourceUnavailable: see the module docstring; load the model instead.
    """

    def __init__(self, chunks: list, ckpt_dir: str, wanted, tp: int = 1, tp_rank: int = 0):
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        from megatron_sdpg.weights.mapping_base import tp_attrs

        self.tensors = CheckpointTensors(ckpt_dir)
        names = {p.untyped_storage().data_ptr(): (gname, p)
                 for gname, p in global_named_parameters(chunks) if wanted(gname)}
        pieces: dict[str, list] = {g: [] for g, _ in names.values()}
        for chunk in chunks:
            sharded = chunk.sharded_state_dict()
            apply_factories(sharded)
            for sh in nested_values(sharded):
                if isinstance(sh, ShardedTensor) and isinstance(sh.data, torch.Tensor):
                    owner = names.get(sh.data.untyped_storage().data_ptr())
                    if owner is not None:
                        pieces[owner[0]].append(sh)
        self._regions: dict[str, list[_Region]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for gname, param in names.values():
            is_tp, dim, _ = tp_attrs(param)
            split = is_tp and tp > 1
            row = max(1, param[0].numel()) if param.dim() else 1
            regions = []
            for sh in pieces[gname]:
                first = sh.data.storage_offset() - param.storage_offset()
                if sh.flattened_range is not None or not sh.data.is_contiguous() or first % row or sh.data.numel() % row:
                    raise CheckpointSourceUnavailable(f"{sh.key!r}: a piece that is not whole rows of {gname}")
                offsets = list(sh.global_offset)
                sizes = [1] * sh.prepend_axis_num + list(sh.local_shape)
                shape = list(sh.data.shape)
                if split:  # the whole parameter: this piece's box widened over every TP rank's share
                    ax = sh.prepend_axis_num + dim
                    offsets[ax] -= tp_rank * sizes[ax]
                    sizes[ax] *= tp
                    shape[dim] *= tp
                regions.append(_Region(first // row, sh.key, tuple(offsets), tuple(sizes), tuple(shape)))
            if split and dim == 0:  # rows of the whole parameter follow the pieces' global order
                ax = [len(r.offsets) - len(r.shape) for r in regions]
                base = min((r.offsets[a] for r, a in zip(regions, ax)), default=0)
                regions = [_Region(r.offsets[a] - base, r.key, r.offsets, r.sizes, r.shape) for r, a in zip(regions, ax)]
            regions.sort(key=lambda r: r.row)
            nrows, want = 0, full_shape(param, tp if split else 1)
            for r in regions:
                if r.row != nrows or list(r.shape[1:]) != want[1:]:
                    break
                self.tensors.locate_all(r.key, self.tensors.pieces_covering(r.key, r.offsets, r.sizes, param.dtype))
                nrows += r.shape[0] if r.shape else 1
            if not regions or nrows != (want[0] if want else 1):
                raise CheckpointSourceUnavailable(f"the checkpoint's pieces of {gname} do not tile the parameter")
            self._regions[gname] = regions
            self._dtypes[gname] = param.dtype

    def full_blocks(self, gname: str, param: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """The whole (unsharded) ``param`` as ``(first row, tensor)`` blocks in row order.

        Blocks are views of the checkpoint files wherever one stored piece holds them: a
        parameter spread over TP pieces along its rows comes as one block per piece.
        """
        blocks = []
        for r in self._regions[gname]:
            axis = len(r.offsets) - len(r.shape)  # the parameter's first dimension in the stored tensor
            for first, slab in self.tensors.box_rows(r.key, r.offsets, r.sizes, self._dtypes[gname], axis):
                blocks.append((r.row + first, slab.reshape(slab.shape[axis], *r.shape[1:])))
        return blocks


def _intersection(a_off, a_size, b_off, b_size) -> list[tuple[int, int]] | None:
    box = []
    for ao, asz, bo, bsz in zip(a_off, a_size, b_off, b_size):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if lo >= hi:
            return None
        box.append((lo, hi))
    return box


def _slices(offsets, sizes, base) -> tuple[slice, ...]:
    return tuple(slice(o - b, o - b + s) for o, s, b in zip(offsets, sizes, base))
