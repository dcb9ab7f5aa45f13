"""The tiny Llama of the embedded CPU default, built from a transformers config."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

# ~1.0M parameters (tiny), ~1.8M (small) and ~27k (test: runs in seconds in the test suite).
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=448),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=512),
    "test": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64),
}


def build_model(size: str, tokenizer, max_positions: int = 1024, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised Llama of a named size for ``tokenizer``'s vocabulary.

    Args:
        size: A key of ``SIZES``.
        tokenizer: Gives the vocabulary size and the EOS / pad ids.
        max_positions: ``max_position_embeddings``.
        seed: Seed of the initialisation.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-5,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64
    )
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_hf_dir(model, tokenizer, out_dir: str, metadata: dict) -> None:
    """Writes an HF directory (config, generation config, safetensors, tokenizer,
    ``sdpg_task.json``) atomically: built beside ``out_dir`` and renamed into place."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "sdpg_task.json"), "w") as f:
            json.dump(metadata, f, indent=2)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
