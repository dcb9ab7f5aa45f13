"""Tiny random HF models built locally from configs (never downloaded), for tests and benchmarks.

* :func:`build_tiny_llama` writes a Llama checkpoint with a word-level tokenizer
  (token ``i`` is the word ``t{i}``; id 0 is ``<pad>``, 1 is ``</s>`` (EOS), 2 is ``<s>``),
  used by the rollout tests and benchmarks.
* :func:`tiny_hf_model` builds one model per mapping feature (``CASES``): GQA with
  Llama-3 RoPE scaling (all three frequency regimes: ``original_max_position_embeddings``
  is small), Qwen2's qkv bias, Qwen3's qk-norm with tied embeddings,
  ``head_dim * heads != hidden`` and a vocabulary of 101 rows (padded to 102 at TP2).
  Weights are drawn with scales that give logits of order one, so a wrong mapping
  shows up far above fp32 noise.
"""

from __future__ import annotations

import os

import torch

EOS_ID = 1
CASES = ("llama_gqa_rope3", "qwen2_bias", "qwen3_tied_oddvocab")


def build_tiny_llama(path: str, vocab_size: int = 128, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """Writes ``config.json``, ``model.safetensors`` and a tokenizer to ``path``; returns ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "<s>": 2}
    words.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<pad>")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=EOS_ID,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so sampling is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def load_hf_model(path: str):
    """The checkpoint at ``path`` as an fp32 ``transformers`` model in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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
