"""The SDPG loss on the last pipeline stage, in Megatron's ``loss_func`` contract.

``sdpg_loss`` turns one micro-batch's vocab-parallel logits into
``(loss_sum, num_tokens, metrics)``: Megatron sums ``loss_sum`` and ``num_tokens``
over micro-batches and DP ranks and divides, so every aggregation mode is
expressed as a (numerator, denominator) pair (see ``loss_terms.aggregate``).

Objective ``policy_gradient`` (SDPG, and GRPO/DAPO with ``beta = 0``), per token::

    l_t = w_tis * PPO-clip(A, r) + beta(k) * SG[rho] * m_i * min(KL_t, clamp)
          + alpha * SG[rho] * f_K(log pi - log pi_ref)

with ``rho = pi / pi_rollout`` (``pi_old`` when no rollout log-probs are given)
when ``sg_rho_factors`` is on (appendix A.3) and 1 otherwise, capped at
``sg_rho_cap`` when set (metrics ``sg_rho_max``, before the cap, and
``sg_rho_capped_frac``), ``m_i`` the
positive-advantage gate, ``w_tis`` the truncated IS weight (``tis_cap``; metrics
``tis_weight``, its mean, and ``tis_capped_frac``).
``policy_gradient_term`` False drops the PPO-clip term (the rest stays).
Objective ``opsd``: ``l_t = beta(k) * D_t`` with ``D`` the configured divergence
to the teacher (no reward term, no reference KL).

Metrics are a dict ``name -> (sum, count)`` of 0-dim fp32 tensors (detached, on
the logits' device).
Reduce over micro-batches and DP ranks by summing both entries and dividing;
names ending in ``_max`` hold ``(max, 1)`` and are reduced with MAX instead
(``reduce_metrics`` does the local part).
"""

from __future__ import annotations

import dataclasses
import math

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sdpg.algo.config import AlgorithmConfig
from megatron_sdpg.algo.loss_terms import (
    aggregate,
    beta_schedule,
    ppo_clip_loss,
    reference_kl_term,
    truncated_is_weight,
)
from megatron_sdpg.ops.fused_output import fused_output_terms
from megatron_sdpg.ops.vocab_parallel import entropy, full_vocab_kl, generalized_jsd, is_greedy_token, token_log_probs
from megatron_sdpg.ops.vocab_parallel_fused import log_probs_kl_entropy

MAX_SUFFIX = "_max"


@dataclass
class LossInputs:
    """Per-token tensors ``[T]`` of one micro-batch (flattened like the logits' rows).

    Attributes:
        target: Sampled token ids (global vocabulary ids; any valid id on padding).
        loss_mask: 1 on response tokens, 0 on prompt/padding.
        advantages: The sequence advantage repeated on its tokens.
        old_log_probs: Behaviour-policy log-probs of ``target``; None means fully
            on-policy (one update per rollout batch): the current log-probs, detached.
        seq_index: Sequence id in ``[0, num_sequences)`` of each token.
        ref_log_probs: Reference-policy log-probs; needed when ``alpha > 0`` and the
            KL is in the loss.
        rollout_log_probs: The rollout engine's log-probs (TIS, SG[rho], metrics).
        gate: ``[num_sequences]`` per-sequence distillation gate (bool); None derives
            it per token from ``advantages > 0``.
        num_sequences: Sequences in the micro-batch; None = ``seq_index.max() + 1``.
    """

    target: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_log_probs: torch.Tensor | None
    seq_index: torch.Tensor
    ref_log_probs: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    num_sequences: int | None = None


@dataclass
class OutputHidden:
    """The loss's inputs before the output layer (``algorithm.fused_output``): no logits exist.

    Attributes:
        student: ``[T, h]`` the student's final hidden states at the response positions.
        teacher: ``[T, h]`` the teacher's on the same response tokens, or None.
        weight: ``[V/tp, h]`` this rank's shard of the output layer (the embedding when tied).
        vocab_size: The unpadded vocabulary (padded ids are masked).
        teacher_weight: ``[V/tp, h]`` the teacher's output shard; None = ``weight``.
    """

    student: torch.Tensor
    teacher: torch.Tensor | None
    weight: torch.Tensor
    vocab_size: int
    teacher_weight: torch.Tensor | None = None


def _terms_from_hidden(hidden: OutputHidden, target: torch.Tensor, needs_teacher: bool, cfg: AlgorithmConfig,
                       tp_group, eager_loss=None):
    """``(log_probs, divergence or None, entropy, teacher_greedy or None)`` via ``ops.fused_output``."""
    out = fused_output_terms(
        hidden.student, hidden.teacher if needs_teacher else None, hidden.weight, target, tp_group,
        vocab_size=hidden.vocab_size, temperature=cfg.logprob_temperature(),
        teacher_temperature=cfg.teacher_temperature(), teacher_weight=hidden.teacher_weight,
        divergence=cfg.distill_divergence, jsd_beta=cfg.jsd_beta, pointwise_clip=cfg.pointwise_clip,
        op_chunk_size=cfg.vocab_chunk_size, teacher_greedy=needs_teacher and cfg.distill_mask_after_divergence,
        eager_loss=eager_loss,
    )
    return out.log_probs, out.divergence, out.entropy, out.teacher_greedy


def distill_divergence(student_logits, teacher_logits, cfg: AlgorithmConfig, tp_group) -> torch.Tensor:
    """Per-token divergence ``[T]`` of the student from the (detached) teacher, per ``cfg``."""
    kw = dict(tp_group=tp_group, temperature=cfg.logprob_temperature(), chunk_size=cfg.vocab_chunk_size,
              teacher_temperature=cfg.teacher_temperature())
    if cfg.distill_divergence == "reverse_kl" and cfg.pointwise_clip is None:
        return full_vocab_kl(student_logits, teacher_logits, **kw, backend=cfg.vocab_backend)
    beta = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": cfg.jsd_beta}[cfg.distill_divergence]
    return generalized_jsd(student_logits, teacher_logits, beta, pointwise_clip=cfg.pointwise_clip, **kw)


def after_first_divergence(divergent: torch.Tensor, seq_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Marks the tokens strictly after each sequence's first divergent token.

    Args:
        divergent: ``[T]`` bool, True where the sampled token left the teacher's path.
        seq_index: ``[T]`` sequence id of each token; a sequence's tokens appear in
            response order (not necessarily contiguous with each other's sequences).
        num_sequences: Number of sequence ids.

    Returns:
        ``[T]`` bool.
    """
    if divergent.numel() == 0:
        return divergent.clone()
    seq = seq_index.long()
    order = torch.argsort(seq, stable=True)  # group each sequence's tokens, keep their order
    d = divergent[order].long()
    before = torch.cumsum(d, 0) - d  # divergent tokens strictly before, counted from the start
    start = torch.full((num_sequences,), torch.iinfo(torch.long).max, dtype=torch.long, device=d.device)
    start = start.scatter_reduce(0, seq[order], before, reduce="amin")
    after_sorted = (before - start[seq[order]]) > 0
    out = torch.empty_like(divergent)
    out[order] = after_sorted
    return out


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum().detach().float()


def sdpg_loss(
    student_logits: torch.Tensor | OutputHidden,
    teacher_logits: torch.Tensor | None,
    batch: LossInputs,
    cfg: AlgorithmConfig,
    step: int,
    tp_group: dist.ProcessGroup | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """SDPG / GRPO / DAPO / OPSD loss of one micro-batch.

    Args:
        student_logits: ``[T, V/tp]`` vocab-parallel logits of the student sequence's
            response positions (the rows matching ``batch``); or, with
            ``algorithm.fused_output``, an :class:`OutputHidden` (hidden states, the
            teacher's included, and the output shard: no logits are formed and
            ``teacher_logits`` is ignored).
        teacher_logits: ``[T, V/tp]`` the privileged teacher's logits on the same
            response tokens (detached inside); may be None when ``beta(k) == 0``.
        batch: Per-token inputs.
        cfg: Validated algorithm config.
        step: 1-based training step ``k`` for ``beta(k)``.
        tp_group: Tensor-parallel group the vocabulary is split over.
        inplace_backward: On the fused reverse-KL path, write the gradient into
            ``student_logits``' storage (saves one ``[T, V/tp]`` buffer). Only for
            logits nothing reads after the backward, e.g. a private ``index_select``
            copy; an autograd node that saved them fails loudly on its version check.

    Returns:
        ``(loss_sum, normaliser, metrics)``; ``loss_sum / normaliser`` is this
        micro-batch's loss (see module docstring for the metrics).
    """
    mask = batch.loss_mask.bool()
    n_tok = mask.sum().float()
    num_seqs = batch.num_sequences
    if num_seqs is None:
        num_seqs = int(batch.seq_index.max()) + 1 if batch.seq_index.numel() else 0
    beta_k = beta_schedule(step, cfg.beta_base, cfg.schedule_steps(), cfg.beta_warmup_steps, cfg.beta_decay_steps)
    kw = dict(tp_group=tp_group, temperature=cfg.logprob_temperature(), chunk_size=cfg.vocab_chunk_size)
    opsd = cfg.objective == "opsd"
    needs_teacher = beta_k > 0 or opsd

    def objective(log_probs, div, ent, teacher_greedy, batch=batch):
        """Everything after the vocabulary terms: ``(loss_sum, normaliser, metrics)``."""
        one = torch.ones((), device=log_probs.device)
        metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {"beta": (one * beta_k, one)}
        metrics["entropy"] = (_masked_sum(ent, mask), n_tok)

        if batch.old_log_probs is None:
            batch = dataclasses.replace(batch, old_log_probs=log_probs.detach())
        rho = torch.ones_like(log_probs)
        behaviour = batch.rollout_log_probs if batch.rollout_log_probs is not None else batch.old_log_probs
        if cfg.sg_rho_factors and not opsd:
            rho = (log_probs.detach() - behaviour).clamp(-20.0, 20.0).exp()
            top = torch.where(mask, rho, torch.zeros_like(rho)).max() if rho.numel() else rho.new_zeros(())
            metrics["sg_rho" + MAX_SUFFIX] = (top.float(), one)
            metrics["sg_rho"] = (_masked_sum(rho, mask), n_tok)  # the mean, before the cap
            cap = cfg.sg_rho_cap if cfg.sg_rho_cap is not None else math.inf
            metrics["sg_rho_capped_frac"] = (_masked_sum((rho > cap).float(), mask), n_tok)
            rho = rho.clamp(max=cap)

        per_token = torch.zeros_like(log_probs)
        if not opsd and cfg.policy_gradient_term:
            pg, clipped, dual = ppo_clip_loss(
                log_probs, batch.old_log_probs, batch.advantages, cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c
            )
            if cfg.tis_cap is not None and batch.rollout_log_probs is not None:
                tis = truncated_is_weight(batch.old_log_probs, batch.rollout_log_probs, cfg.tis_cap)
                pg = pg * tis
                metrics["tis_weight"] = (_masked_sum(tis, mask), n_tok)
                metrics["tis_capped_frac"] = (_masked_sum((tis >= cfg.tis_cap).float(), mask), n_tok)
            per_token = per_token + pg
            metrics["policy_loss"] = (_masked_sum(pg, mask), n_tok)
            metrics["clip_frac"] = (_masked_sum(clipped.float(), mask), n_tok)
            metrics["dual_clip_frac"] = (_masked_sum(dual.float(), mask), n_tok)

        if needs_teacher:
            if cfg.distill_kl_clamp is not None:
                div = div.clamp(max=cfg.distill_kl_clamp)
            gate = mask
            if cfg.distill_gate and not opsd:
                if batch.gate is not None:
                    gate = mask & batch.gate.bool()[batch.seq_index.long()]
                else:
                    gate = mask & (batch.advantages > 0)
            if cfg.distill_mask_after_divergence:
                if teacher_greedy is None:
                    teacher_greedy = is_greedy_token(teacher_logits.detach(), batch.target, tp_group)
                divergent = mask & ~teacher_greedy
                after = mask & after_first_divergence(divergent, batch.seq_index, num_seqs)
                gate = gate & ~after
                metrics["distill_masked_frac"] = (_masked_sum(after.float(), mask), n_tok)
            per_token = per_token + beta_k * rho * torch.where(gate, div, torch.zeros_like(div))
            metrics["distill_kl"] = (_masked_sum(div, mask), n_tok)
            metrics["distill_gated_frac"] = (_masked_sum(gate.float(), mask), n_tok)

        if batch.ref_log_probs is not None:
            if cfg.alpha > 0 and not cfg.ref_kl_in_reward and not opsd:
                f_k = reference_kl_term(log_probs, batch.ref_log_probs, cfg.ref_kl_mode)
                per_token = per_token + cfg.alpha * rho * f_k
            with torch.no_grad():
                k3 = reference_kl_term(log_probs.detach(), batch.ref_log_probs, "k3")
            metrics["ref_kl"] = (_masked_sum(k3, mask), n_tok)
        elif cfg.alpha > 0 and not cfg.ref_kl_in_reward and not opsd:
            raise ValueError("batch.ref_log_probs is None but alpha > 0 puts the reference KL in the loss")

        if batch.rollout_log_probs is not None:
            diff = (log_probs.detach() - batch.rollout_log_probs).abs()
            metrics["rollout_logp_abs_diff"] = (_masked_sum(diff, mask), n_tok)
            top = torch.where(mask, diff, torch.zeros_like(diff)).max() if diff.numel() else diff.new_zeros(())
            metrics["rollout_logp_abs_diff" + MAX_SUFFIX] = (top.detach().float(), one)

        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
        loss_sum, normaliser = aggregate(per_token, mask, batch.seq_index, num_seqs, cfg.loss_agg, cfg.loss_agg_constant)
        metrics["loss"] = (loss_sum.detach().float(), normaliser.detach().float())
        return loss_sum, normaliser, metrics

    teacher_greedy = None
    if isinstance(student_logits, OutputHidden):
        if needs_teacher and student_logits.teacher is None:
            raise ValueError(f"the teacher's hidden states are None but beta(k={step}) = {beta_k} needs the teacher")
        # The loss is a per-token function of (log-prob, divergence): the op can take its gradient
        # chunk by chunk during the forward (no recomputed matmuls), unless the divergence mask
        # ties a token to the teacher's choices at other tokens.
        eager = None if cfg.distill_mask_after_divergence else (
            lambda lp, dv: objective(lp, dv, torch.zeros_like(lp), None)[0])
        log_probs, div, ent, teacher_greedy = _terms_from_hidden(student_logits, batch.target, needs_teacher, cfg,
                                                                 tp_group, eager)
    elif needs_teacher and teacher_logits is None:
        raise ValueError(f"teacher_logits is None but beta(k={step}) = {beta_k} needs the teacher")
    elif needs_teacher and cfg.distill_divergence == "reverse_kl" and cfg.pointwise_clip is None:
        # One pass over the vocabulary and one gradient buffer for all three statistics.
        log_probs, div, ent = log_probs_kl_entropy(student_logits, teacher_logits, batch.target, **kw,
                                                   inplace_backward=inplace_backward, backend=cfg.vocab_backend,
                                                   teacher_temperature=cfg.teacher_temperature())
    else:
        log_probs = token_log_probs(student_logits, batch.target, **kw)
        with torch.no_grad():
            ent = entropy(student_logits.detach(), **kw)
        div = distill_divergence(student_logits, teacher_logits, cfg, tp_group) if needs_teacher else None
    return objective(log_probs, div, ent, teacher_greedy)


def reduce_metrics(per_micro_batch: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, float]:
    """Combines metric dicts of several micro-batches into values (``sum/count``, or max).

    Across DP ranks, all-reduce the stacked sums and counts with SUM (and the
    ``_max`` entries with MAX) before dividing; this function is the local step.
    """
    sums: dict[str, list[float]] = {}
    for metrics in per_micro_batch:
        for name, (value, count) in metrics.items():
            acc = sums.setdefault(name, [float("-inf"), 0.0] if name.endswith(MAX_SUFFIX) else [0.0, 0.0])
            if name.endswith(MAX_SUFFIX):
                acc[0] = max(acc[0], float(value))
                acc[1] = 1.0
            else:
                acc[0] += float(value)
                acc[1] += float(count)
    return {name: (v if name.endswith(MAX_SUFFIX) else (v / c if c else 0.0)) for name, (v, c) in sums.items()}
