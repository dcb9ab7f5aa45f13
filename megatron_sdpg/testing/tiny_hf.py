"""Tiny random HF models of each supported family, built from configs (never downloaded).

Each case exercises one mapping feature: GQA with Llama-3 RoPE scaling (all three
frequency regimes: ``original_max_position_embeddings`` is small), Qwen2's qkv
bias, Qwen3's qk-norm with tied embeddings, ``head_dim * heads != hidden`` and a
vocabulary of 101 rows (padded to 102 at TP2). Weights are drawn with scales that
give logits of order one, so a wrong mapping shows up far above fp32 noise.
"""

from __future__ import annotations

import torch

CASES = ("llama_gqa_rope3", "qwen2_bias", "qwen3_tied_oddvocab")


def tiny_hf_config(case: str):
    """The ``transformers`` config of a test case."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-6)
    if case == "llama_gqa_rope3":
        return LlamaConfig(vocab_size=128, num_key_value_heads=2, rope_theta=500000.0, **common,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if case == "qwen2_bias":
        return Qwen2Config(vocab_size=128, num_key_value_heads=4, rope_theta=1e6, **common)
    if case == "qwen3_tied_oddvocab":
        return Qwen3Config(vocab_size=101, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, **common)
    raise ValueError(f"unknown tiny model case {case!r}; known: {CASES}")


@torch.no_grad()
def tiny_hf_model(case: str, seed: int = 0):
    """A float32 ``AutoModelForCausalLM`` of ``case`` with random, non-trivial weights.

    Matrices ~ N(0, 0.6/sqrt(fan_in)), norm weights ~ U(0.5, 1.5), biases ~ N(0, 0.1).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(case)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif p.dim() == 1:
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * (0.6 / p.shape[1] ** 0.5))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model
