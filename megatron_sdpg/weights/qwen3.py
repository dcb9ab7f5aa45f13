"""Qwen3 family: Llama naming plus per-head RMSNorm of queries and keys (qk-norm).

``self_attn.q_norm`` / ``k_norm`` (``[head_dim]``) map to Megatron's
``q_layernorm`` / ``k_layernorm``; both are replicated across TP ranks.
"""

from megatron_sdpg.weights.mapping_base import FamilyMapping


class Qwen3Mapping(FamilyMapping):
    """Llama tensors plus ``self_attn.{q,k}_norm.weight``."""

    family = "qwen3"
    qk_norm = True
