"""HF tensors -> this rank's Megatron parameters (sharded for TP, split by PP stage)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.models.init import global_named_parameters
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.weights import mapping_for


@torch.no_grad()
def load_hf_weights_into(chunks: list, model_cfg: ModelConfig, groups: ParallelGroups,
                         hf_state: Mapping[str, torch.Tensor], progress: bool = False) -> int:
    """Copies HF weights into this rank's Megatron parameters.

    Each rank reads only the HF tensors its parameters are built from (pass a
    :class:`~megatron_sdpg.formats.hf_io.SafetensorsReader` to read lazily from
    disk), and copies this rank's TP shard of each fused parameter (QKV per
    query group, ``[gate; up]``, vocabulary padded to the model's padded size)
    straight into it, casting to the parameter dtype: one copy per byte, no
    full-size intermediates. No collectives: every rank works alone.

    Call it before the optimizer takes fp32 master copies of the parameters (or
    reload them afterwards).

    Args:
        chunks: This rank's bare ``GPTModel`` chunks (``PolicyModel.unwrapped()``).
        model_cfg: The architecture the chunks were built from.
        groups: Process groups of this rank.
        hf_state: ``{hf_name: tensor}`` of the whole model (read lazily).
        progress: Show a tqdm bar on this rank.

    Returns:
        The number of parameters loaded.

    Raises:
        WeightMappingError: a tensor is missing, unexpected or misshapen (one line naming it).
    """
    mapping = mapping_for(model_cfg)
    mapping.check_hf_names(hf_state.keys())
    tp, tp_rank = groups.layout.tp, groups.tp_rank
    todo = list(global_named_parameters(chunks))
    bar = _progress(len(todo), "load HF", progress)
    for gname, param in todo:
        mapping.copy_local_(gname, param, [hf_state[n] for n in mapping.rule(gname).hf_names], tp, tp_rank)
        bar.update(1)
    bar.close()
    return len(todo)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    rank = dist.get_rank() if dist.is_initialized() else 0
    return tqdm(total=total, desc=f"{desc} [rank {rank}]", disable=not enabled, unit="tensor", leave=False)
