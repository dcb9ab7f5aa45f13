"""Per-token loss terms of SDPG and its baselines, and how they are aggregated.

Every function works on flat per-token tensors ``[T]`` (the response tokens of a
micro-batch, padding included and masked by the caller) and is written from the
paper's formulas (Liu et al. 2026, eq. 3.1, sections 3.4-3.5, appendices A.2-A.3).
"""

from __future__ import annotations

import torch

LOG_RATIO_LIMIT = 20.0
"""Log-ratios are clamped to +-20 before ``exp`` so one stale token cannot overflow."""


def _safe_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate with separate low/high clip and dual clip (appendix A.3).

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = pi / pi_old``;
    for ``A < 0`` and ``dual_clip_c`` set, ``loss = min(loss, -A c)``. On-policy
    (``r == 1``) its gradient is REINFORCE's ``-A grad log pi``.

    Args:
        log_probs: ``[T]`` current log-probs of the sampled tokens (differentiable).
        old_log_probs: ``[T]`` behaviour-policy log-probs.
        advantages: ``[T]`` per-token (sequence) advantages.

    Returns:
        ``(loss [T], clipped [T] bool, dual_clipped [T] bool)``; ``clipped`` marks
        tokens where the clipped branch is the active one.
    """
    ratio = _safe_exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped_branch = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped_branch)
    clipped = clipped_branch > unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
    return loss, clipped, dual


def truncated_is_weight(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight ``min(pi_old / pi_rollout, cap)`` per token (no gradient)."""
    return _safe_exp(old_log_probs - rollout_log_probs).clamp(max=cap).detach()


def reference_kl_term(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token reference-KL surrogate in ``log w = log pi - log pi_ref`` (gradient through pi).

    - ``ufkl``: ``1/w + log w`` (unnormalised forward KL, sec. 3.4; = k3 + 1)
    - ``urkl``: ``(log w)^2 / 2`` (unnormalised reverse KL, sec. 3.4)
    - ``fkl``: ``1/w``; ``rkl``: ``(log w + 1)^2 / 2`` (normalised, appendix A.2)
    - ``k1``: ``log w``; ``k2``: ``(log w)^2 / 2``; ``k3``: ``1/w - 1 + log w`` (Schulman)
    """
    log_w = (log_probs - ref_log_probs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if mode == "ufkl":
        return torch.exp(-log_w) + log_w
    if mode in ("urkl", "k2"):
        return 0.5 * log_w.square()
    if mode == "fkl":
        return torch.exp(-log_w)
    if mode == "rkl":
        return 0.5 * (log_w + 1.0).square()
    if mode == "k1":
        return log_w
    if mode == "k3":
        return torch.exp(-log_w) - 1.0 + log_w
    raise ValueError(f"unknown reference KL mode {mode!r}")


def beta_schedule(step: int, beta_base: float, total_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """``beta(k) = beta_base * min(1, k / T_warm) * min(1, (T - k) / T_decay)``, floored at 0.

    ``step`` is the 1-based training step ``k``; a zero window disables its factor.
    """
    warm = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    decay = 1.0 if decay_steps == 0 else min(1.0, (total_steps - step) / decay_steps)
    return beta_base * max(0.0, warm) * max(0.0, decay)


def aggregate(
    per_token: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
    mode: str,
    constant: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, normaliser)`` for Megatron's ``sum(loss_sum) / sum(normaliser)`` contract.

    - ``token-mean``: (sum of token losses, number of response tokens)
    - ``seq-mean-token-mean``: (sum over sequences of their token-mean, number of
      sequences with at least one response token)
    - ``seq-mean-token-sum``: (sum of token losses, same sequence count)
    - ``constant`` (Dr.GRPO): (sum of token losses / ``constant``, ``num_sequences``),
      every sequence counted, empty ones too. The constant is folded into the
      numerator so that the normaliser stays a whole number (Megatron sums it as
      an int): the ratio is ``sum / (constant * num_sequences)`` exactly.

    Args:
        per_token: ``[T]`` losses (already 0 off the mask).
        loss_mask: ``[T]`` 1 on response tokens.
        seq_index: ``[T]`` sequence id in ``[0, num_sequences)`` of each token.
    """
    mask = loss_mask.bool()
    values = torch.where(mask, per_token, torch.zeros_like(per_token))
    if mode == "token-mean":
        return values.sum(), mask.sum().to(values.dtype)
    idx = seq_index.long()
    seq_sum = values.new_zeros(num_sequences).index_add_(0, idx, values)
    seq_len = values.new_zeros(num_sequences).index_add_(0, idx, mask.to(values.dtype))
    non_empty = seq_len > 0
    if mode == "seq-mean-token-mean":
        means = torch.where(non_empty, seq_sum / seq_len.clamp(min=1), torch.zeros_like(seq_sum))
        return means.sum(), non_empty.sum().to(values.dtype)
    if mode == "seq-mean-token-sum":
        return seq_sum.sum(), non_empty.sum().to(values.dtype)
    if mode == "constant":
        if constant is None:
            raise ValueError("loss_agg 'constant' needs a constant normaliser")
        return seq_sum.sum() / float(constant), values.new_tensor(float(num_sequences))
    raise ValueError(f"unknown loss aggregation {mode!r}")
