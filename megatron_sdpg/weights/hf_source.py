"""Megatron parameter values read from HF files at the moment a checkpoint writes them.

An HF -> Megatron conversion does not need the model in memory: every stored
tensor is a rearrangement of HF tensors. :class:`HFParamSource` answers "what
are the bytes of this parameter (or this part of it)?" straight from the HF
files: a plain copy, either half of ``linear_fc1`` or a vocabulary table that
needs no padding is a zero-copy view of the file's pages, and only what no view
can express (the per-group fused QKV, padded vocabulary rows, a cast) is built,
one tensor at a time. :func:`~megatron_sdpg.weights.checkpoint.save_megatron_checkpoint`
asks it for each tensor as it writes, so the parameters of the (unallocated)
model are never filled and the conversion touches about half the memory pages
that loading the model first would (see ``docs/converters.md``).
"""

from __future__ import annotations

import torch

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.models.init import global_named_parameters
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.weights import mapping_for
from megatron_sdpg.weights.mapping_base import row_range


class HFParamSource:
    """The values of this rank's parameters, taken from an HF directory on demand.

    Construction checks every HF tensor's name and shape against the model (from
    the file headers only), so bad input fails before anything is written.

    Args:
        chunks: This rank's bare ``GPTModel`` chunks (their parameters' memory is not read).
        model_cfg: The architecture.
        groups: Process groups of this rank (TP size and rank).
        hf_state: ``{hf_name: tensor}``, e.g. a lazy
            :class:`~megatron_sdpg.formats.hf_io.SafetensorsReader` (whose ``meta``
            gives shapes without mapping the data).
        progress: A tqdm bar (bytes produced) on this rank.

    Raises:
        WeightMappingError: an HF tensor is missing, unexpected or misshapen (naming it).
    """

    def __init__(self, chunks: list, model_cfg: ModelConfig, groups: ParallelGroups, hf_state, progress: bool = False):
        from tqdm import tqdm

        self.mapping = mapping_for(model_cfg)
        self.mapping.check_hf_names(hf_state.keys())
        self.hf_state = hf_state
        self.tp, self.tp_rank = groups.layout.tp, groups.tp_rank
        self._params: dict[int, tuple[str, torch.Tensor]] = {}
        for gname, p in global_named_parameters(chunks):
            metas = [_meta(hf_state, n) for n in self.mapping.rule(gname).hf_names]
            self.mapping.local_blocks(gname, p, metas, self.tp, self.tp_rank)  # shape checks only
            self._params[p.untyped_storage().data_ptr()] = (gname, p)
        total = sum(p.numel() * p.element_size() for _, p in self._params.values())
        self._bar = tqdm(total=total, desc="write Megatron", unit="B", unit_scale=True, leave=False,
                         disable=not progress)

    def __call__(self, part: torch.Tensor) -> torch.Tensor:
        """The value of ``part``, a contiguous run of whole rows of one parameter (any view shape).

        Returns:
            A contiguous tensor of ``part``'s shape and dtype (a view of the HF file where possible).

        Raises:
            RuntimeError: ``part`` is not a row range of a parameter this source knows.
        """
        key = part.untyped_storage().data_ptr()
        if key not in self._params:
            raise RuntimeError(f"tensor of shape {tuple(part.shape)} to be saved is not a parameter of this model")
        gname, param = self._params[key]
        row = max(1, param[0].numel()) if param.dim() else 1
        first = part.storage_offset() - param.storage_offset()
        if not part.is_contiguous() or first % row or part.numel() % row or part.dtype != param.dtype:
            raise RuntimeError(f"{gname}: saving a part of shape {tuple(part.shape)} at element {first}, "
                               "not a whole-row range of the parameter")
        start, stop = first // row, (first + part.numel()) // row
        blocks = self.mapping.local_blocks(gname, param, [self.hf_state[n] for n in self.mapping.rule(gname).hf_names],
                                           self.tp, self.tp_rank)
        value = param_rows(blocks, start, stop, param)
        self._bar.update(part.numel() * part.element_size())
        return value.reshape(part.shape)

    def close(self) -> None:
        self._bar.close()


def _meta(hf_state, name: str) -> torch.Tensor:
    if hasattr(hf_state, "meta"):
        return hf_state.meta(name)
    t = hf_state[name]
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def param_rows(blocks: list[tuple[int, torch.Tensor]], start: int, stop: int, param: torch.Tensor) -> torch.Tensor:
    """Rows ``[start, stop)`` of the parameter the blocks make up (rows no block covers are zero).

    One block holding them all gives a view (no copy); otherwise they are assembled.
    """
    pieces = row_range(blocks, start, stop)
    covered = sum(p.shape[0] for p in pieces)
    if len(pieces) == 1 and covered == stop - start:
        return _own_storage(pieces[0].to(param.dtype).contiguous())
    out = torch.empty((stop - start, *param.shape[1:]), dtype=param.dtype)
    row = 0
    for piece in pieces:
        out[row: row + piece.shape[0]].copy_(piece)
        row += piece.shape[0]
    out[covered:].zero_()  # padded vocabulary rows (only ever at the end)
    return out


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) as a tensor whose storage is exactly its bytes, without a copy.

    A TP rank's rows of an HF tensor are a view into the whole tensor's mapping;
    PyTorch-Distributed's writer clones any tensor whose storage is larger than
    its data (``torch.save`` writes whole storages), which would copy every such
    view. The re-wrapped tensor shares the memory and keeps the original alive.
    """
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().nbytes() == nbytes or nbytes == 0:
        return t
    return torch.frombuffer(t.reshape(-1).view(torch.uint8).numpy(), dtype=torch.uint8).view(t.dtype).view(t.shape)
