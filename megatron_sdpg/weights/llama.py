"""Llama family (Llama 2/3, incl. GQA and llama3 RoPE scaling): no qkv bias, no qk-norm.

RoPE scaling changes no tensor: it is carried by :class:`ModelConfig` and applied by
the model builder, so the mapping is the plain Llama naming of :mod:`mapping_base`.
"""

from megatron_sdpg.weights.mapping_base import FamilyMapping


class LlamaMapping(FamilyMapping):
    """``model.layers.i.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, two RMSNorms."""

    family = "llama"
