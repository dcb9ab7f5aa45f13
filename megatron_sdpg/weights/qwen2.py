"""Qwen2 family: Llama naming plus biases on the q, k and v projections.

The biases are fused into Megatron's ``linear_qkv.bias`` with the same
per-query-group layout as the weight.
"""

from megatron_sdpg.weights.mapping_base import FamilyMapping


class Qwen2Mapping(FamilyMapping):
    """Llama tensors plus ``self_attn.{q,k,v}_proj.bias``."""

    family = "qwen2"
    qkv_bias = True
