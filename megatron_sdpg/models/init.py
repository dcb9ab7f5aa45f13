"""Layout-invariant weight initialisation and shard arithmetic.

megatron's own initialisation depends on the layout (pipeline stages consume
the RNG in a different order), so the same seed gives different models at PP1
and PP2. :func:`init_layout_invariant_` instead draws each *full* tensor from a
generator seeded by ``(seed, global parameter name)`` and keeps this rank's
shard, so every layout holds the same model. Used for from-scratch runs and
for the layout-invariance tests.
"""

from __future__ import annotations

import re
import zlib

from collections.abc import Iterator

import torch

from megatron_sdpg.platform.distributed import ParallelGroups

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def layer_offset(chunk) -> int:
    """Global index of this chunk's first decoder layer."""
    layers = chunk.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_param_name(name: str, offset: int) -> str:
    """Rewrites ``decoder.layers.<local>.`` to the global layer index."""
    m = _LAYER.match(name)
    if not m:
        return name
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


def global_named_parameters(chunks: list) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(global name, parameter)`` of every parameter of this rank's chunks, in model order."""
    for chunk in chunks:
        offset = layer_offset(chunk)
        for name, param in chunk.named_parameters():
            yield global_param_name(name, offset), param


def shard_of(full: torch.Tensor, dim: int, stride: int, tp: int, tp_rank: int) -> torch.Tensor:
    """This rank's tensor-parallel shard of a full tensor (megatron's layout).

    The full tensor is split along ``dim`` into ``tp * stride`` equal pieces and
    rank ``r`` keeps pieces ``r, r + tp, ...`` (stride 2 is the fused gate/up
    projection: each rank holds its gate rows then its up rows).
    """
    pieces = torch.chunk(full, tp * stride, dim=dim)
    return torch.cat(pieces[tp_rank::tp], dim=dim)


def full_shape(param: torch.Tensor, tp: int) -> list[int]:
    """The unsharded shape of a (possibly tensor-parallel) parameter."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


@torch.no_grad()
def init_layout_invariant_(chunks: list, groups: ParallelGroups, seed: int, std: float, true_vocab: int) -> None:
    """Re-initialises every parameter of ``chunks`` independently of the layout.

    Weight matrices ~ N(0, std); 1-D norm weights = 1; biases = 0; padded
    vocabulary rows = 0. Tied output weights use the embedding's draw.

    Args:
        chunks: This rank's model chunks (unwrapped ``GPTModel``s).
        groups: Process groups of this rank.
        seed: Base seed.
        std: Standard deviation of weight matrices.
        true_vocab: Unpadded vocabulary size.
    """
    tp = groups.layout.tp
    for chunk in chunks:
        offset = layer_offset(chunk)
        for name, param in chunk.named_parameters():
            gname = global_param_name(name, offset)
            if gname == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
                gname = "embedding.word_embeddings.weight"
            shape = full_shape(param, tp)
            if name.endswith("bias"):
                full = torch.zeros(shape)
            elif param.dim() == 1:
                full = torch.ones(shape)
            else:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
                full = torch.randn(shape, generator=gen) * std
                if gname in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    full[true_vocab:] = 0
            if getattr(param, "tensor_model_parallel", False):
                full = shard_of(full, param.partition_dim, getattr(param, "partition_stride", 1), tp, groups.tp_rank)
            param.copy_(full.to(param.dtype))
