"""Batched, counter-based sampling for the CPU server: every row of a decode step at once.

A row's draw at output position ``t`` depends only on its seed, ``t`` and its own
logits, never on the other rows of the batch nor on how many draws came before:

* ``uniforms(keys, t, v)``: one uniform in (0, 1) per (row, token id), a
  splitmix64 hash of ``(seed, t, token id)`` computed with int64 tensor ops
  (wrapping multiplication; logical shifts by masking);
* ``sample``: Gumbel-max, ``argmax(scaled_logits + Gumbel(u))`` over the tokens
  top-k/top-p keep, which is an exact draw from ``softmax(scaled_logits)``
  restricted to those tokens and renormalised (no sort, no cumulative sum; the
  noise is indexed by token id, so it does not depend on any ordering); greedy
  rows (``top_k == 1``) take the first maximal logit, as ``torch.argmax``.

Top-k keeps every token at least as likely as the k-th (ties kept); top-p then
keeps the smallest most-likely-first prefix whose mass reaches ``top_p`` of what
top-k kept (SGLang's order).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
# splitmix64 (Steele, Lea, Flood 2014) constants as signed int64.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MUL2 = 0x94D049BB133111EB - (1 << 64)
_STEP = 0xD1B54A32D192ED03 - (1 << 64)  # odd constant separating the position counter from the token counter


def seed_key(seed: int) -> int:
    """A Python int seed in ``[-2**63, 2**64)`` as the signed int64 with the same low 64 bits."""
    s = seed & _MASK64
    return s - (1 << 64) if s >= 1 << 63 else s


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (bit pattern of the uint64 result), elementwise."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def uniforms(keys: torch.Tensor, t: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): ``[b] keys, [b] or scalar t -> [b, vocab]`` float64.

    Element ``(i, j)`` is ``(top 53 bits of mix64(mix64(key_i + t_i * STEP) + (j + 1) * GOLDEN) + 0.5) / 2**53``.
    """
    t = torch.as_tensor(t, dtype=torch.long)
    row = mix64(keys + t * _STEP)  # [b]
    ids = torch.arange(1, vocab + 1, dtype=torch.long) * _GOLDEN  # [v]
    bits = _shr(mix64(row[:, None] + ids[None, :]), 11)  # [b, v], 53 bits
    return (bits.double() + 0.5) * 2.0**-53


def keep_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Tokens each row may sample after top-k then top-p: ``[b, v] -> [b, v]`` bool.

    Args:
        scaled: Temperature-scaled logits ``[b, v]``.
        top_k: ``[b]`` int64; 0 keeps the whole vocabulary.
        top_p: ``[b]`` float; 1 keeps what top-k kept.
    """
    b, v = scaled.shape
    sorted_l, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [b, v]
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    kth = sorted_l.gather(1, (k - 1)[:, None])  # [b, 1]
    keep_sorted = sorted_l >= kth
    probs = torch.softmax(sorted_l.double(), dim=-1) * keep_sorted
    cum = probs.cumsum(-1)
    drop = (cum - probs) > top_p.double()[:, None] * cum[:, -1:]  # mass before this token already reaches top_p
    keep_sorted &= ~(drop & (top_p < 1.0)[:, None])
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def sample(scaled: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, filtered: bool | None = None) -> torch.Tensor:
    """One token per row: ``[b, v]`` scaled logits -> ``[b]`` int64 ids.

    Args:
        scaled: Temperature-scaled logits ``[b, v]`` (fp32).
        keys: Per-row ``seed_key`` ``[b]`` int64.
        t: Per-row output position ``[b]`` int64 (the counter of the draw).
        top_k: ``[b]`` int64, 0 for the whole vocabulary, 1 for greedy.
        top_p: ``[b]`` float.
        filtered: Whether any row has top-k > 1 or top-p < 1 (computed when ``None``);
            rows without filters are unaffected either way.
    """
    if filtered is None:
        filtered = bool(((top_k > 1) | (top_p < 1.0)).any())
    u = uniforms(keys, t, scaled.shape[-1])
    scores = scaled.double() - torch.log(-torch.log(u))  # + Gumbel(0, 1)
    if filtered:
        scores = scores.masked_fill(~keep_mask(scaled, top_k, top_p), float("-inf"))
    drawn = scores.argmax(-1)
    return torch.where(top_k == 1, scaled.argmax(-1), drawn)
