"""A tiny random HF Llama checkpoint with a word-level tokenizer, built locally (never downloaded).

Token ``i`` is the word ``t{i}``; id 0 is ``<pad>``, 1 is ``</s>`` (EOS), 2 is ``<s>``.
Used by the rollout tests and benchmarks.
"""

from __future__ import annotations

import os

import torch

EOS_ID = 1


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
