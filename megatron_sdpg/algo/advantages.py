"""Rewards to group-relative advantages (GRPO / Dr.GRPO / DAPO shaping).

Responses arrive grouped: ``rewards[i * G:(i + 1) * G]`` are the ``G`` samples of
prompt ``i``. All functions are per-sequence ``[n]`` tensors; broadcasting the
advantage to tokens is ``advantages[seq_index]``.
"""

from __future__ import annotations

import torch

from megatron_sdpg.algo.loss_terms import reference_kl_term


def verifier_rewards(correct: torch.Tensor, scheme: str = "zero_one") -> torch.Tensor:
    """Binary verifier outcome ``[n]`` (bool) to rewards: 1/0 (``zero_one``) or +1/-1 (``plus_minus_one``)."""
    correct = correct.to(torch.bool)
    if scheme == "zero_one":
        return correct.to(torch.float32)
    if scheme == "plus_minus_one":
        return correct.to(torch.float32) * 2.0 - 1.0
    raise ValueError(f"reward scheme must be 'zero_one' or 'plus_minus_one', got {scheme!r}")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.dim() != 1 or x.numel() % group_size:
        raise ValueError(f"rewards must be [n] with n divisible by group_size={group_size}, got {tuple(x.shape)}")
    return x.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps_std: float = 1e-6
) -> torch.Tensor:
    """``A_i = (R_i - mean_G) / (std_G + eps_std)`` per group (paper eq. 2.1).

    ``std`` is the unbiased standard deviation (``torch.std``). With
    ``normalize_std=False`` (Dr.GRPO) ``A_i = R_i - mean_G``. A group whose
    rewards are all equal (including ``G = 1``) gets exactly 0.

    Args:
        rewards: ``[n]`` rewards, ``n`` a multiple of ``group_size``.

    Returns:
        ``[n]`` fp32 advantages.
    """
    r = _grouped(rewards.to(torch.float32), group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    if normalize_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps_std)
    return torch.where(all_equal, torch.zeros_like(centred), centred).reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: ``[n]`` bool, True for samples of groups whose rewards differ."""
    r = _grouped(rewards, group_size)
    keep = ~(r == r[:, :1]).all(dim=1, keepdim=True)
    return keep.expand_as(r).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment added to the reward ``[n]``.

    0 up to ``max_length - buffer`` tokens, then falling linearly to ``-factor`` at
    ``max_length``, and ``-factor`` beyond. ``buffer == 0`` disables it.
    """
    lengths = lengths.to(torch.float32)
    if buffer <= 0:
        return torch.zeros_like(lengths)
    start = max_length - buffer
    return (-(lengths - start) / buffer * factor).clamp(min=-factor, max=0.0)


def kl_penalized_rewards(
    rewards: torch.Tensor,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_index: torch.Tensor,
    coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """"KL in reward" (GRPO baseline): ``R_i - coef * sum_{t in i} k(log pi - log pi_ref)``.

    Args:
        rewards: ``[n]`` sequence rewards.
        log_probs, ref_log_probs, loss_mask, seq_index: ``[T]`` per token; ``seq_index``
            in ``[0, n)`` says which sequence each token belongs to.
        estimator: Per-token KL estimator ``k1`` (``log w``), ``k2`` or ``k3``.

    Returns:
        ``[n]`` penalised rewards.
    """
    if estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"KL-in-reward estimator must be k1, k2 or k3, got {estimator!r}")
    k = reference_kl_term(log_probs.detach().to(torch.float32), ref_log_probs.to(torch.float32), estimator)
    k = torch.where(loss_mask.bool(), k, torch.zeros_like(k))
    per_seq = torch.zeros_like(rewards, dtype=torch.float32).index_add_(0, seq_index.long(), k)
    return rewards.to(torch.float32) - coef * per_seq
