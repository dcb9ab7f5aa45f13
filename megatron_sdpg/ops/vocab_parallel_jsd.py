"""Generalised Jensen-Shannon divergence of vocab-parallel logits (the OPSD baseline).

Follows TRL's ``generalized_jsd_loss`` (GKD, Agarwal et al. 2024, eq. 1), which
OPSD uses: with ``p_s = softmax(student / T)``, ``p_t = softmax(teacher / T)`` and
the mixture ``m = beta * p_t + (1 - beta) * p_s``,

    JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)      for 0 < beta < 1,
    JSD_0    = KL(p_t || p_s)   (forward KL),
    JSD_1    = KL(p_s || p_t)   (reverse KL).

The two end points are TRL's special cases, not limits of the formula (which
tends to 0 at both ends). The teacher is a constant (stop-gradient).

``pointwise_clip`` clamps each vocabulary entry's term of the sum at a maximum
before summing (the per-entry ``token_clip`` of the OPSD code); clamped entries
pass no gradient.

Gradient w.r.t. the student logits ``z``, with ``u`` the not-clamped indicator
and ``G`` a per-token sum saved by forward (so backward needs no collective):

- ``0 < beta < 1``: ``(1 - beta) p_s (u h - G) / T`` with ``h = log p_s - log m``,
  ``G = sum p_s u h`` (``G = KL(p_s || m)`` without clipping);
- ``beta = 1``: ``p_s (u h - G) / T`` with ``h = log p_s - log p_t + 1``, ``G = sum p_s u h``;
- ``beta = 0``: ``(p_s G - u p_t) / T`` with ``G = sum u p_t`` (``p_s - p_t`` without clipping).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_sdpg.ops.vocab_shard import (
    all_reduce_,
    as_rows,
    check_pair,
    check_temperature,
    chunks,
    global_max,
    resolve_chunk_size,
    resolve_teacher_temperature,
    scaled_fp32,
    upstream_per_row,
    zero_where_nan_,
)


def _terms(ls: torch.Tensor, lt: torch.Tensor, beta: float, clip: float | None):
    """Per-entry terms on one chunk of normalised log-probs ``[c, v/tp]``.

    Returns:
        ``(e, u, s, h)``: the per-entry divergence term ``e`` (clamped), the
        not-clamped mask ``u``, ``p_s`` and the gradient factor ``h`` (``p_t``
        when ``beta == 0``).
    """
    s = ls.exp()
    t = lt.exp()
    if beta == 0.0:
        e = zero_where_nan_(t * (lt - ls))
        h = t
    elif beta == 1.0:
        e = zero_where_nan_(s * (ls - lt))
        h = ls - lt + 1.0
    else:
        log_m = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        h = ls - log_m
        e = zero_where_nan_(t * (lt - log_m)).mul_(beta)
        e.add_(zero_where_nan_(s * h), alpha=1.0 - beta)
        del log_m
    if clip is None:
        u = None
    else:
        u = e <= clip
        e = e.clamp_(max=clip)
    return e, u, s, h


def _gradient_sum(u, s, h, beta: float) -> torch.Tensor:
    """The per-token ``G`` of the module docstring, ``[c]`` (this shard's part)."""
    if beta == 0.0:
        w = h if u is None else h * u
        return w.sum(dim=-1)
    w = h if u is None else torch.where(u, h, torch.zeros_like(h))
    return zero_where_nan_(s * w).sum(dim=-1)


class _GeneralizedJSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, beta, tp_group, temperature, chunk_size, clip, t_temperature):
        s_rows, t_rows = as_rows(student), as_rows(teacher)
        n = s_rows.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=s_rows.device)
        lse = torch.empty(2, n, dtype=torch.float32, device=s_rows.device)
        g_sum = torch.empty(n, dtype=torch.float32, device=s_rows.device)
        for sl in chunks(n, chunk_size):
            zs = scaled_fp32(s_rows[sl], temperature)
            zt = scaled_fp32(t_rows[sl], t_temperature)
            m = global_max([zs, zt], tp_group)
            zs.sub_(m[0, :, None])
            zt.sub_(m[1, :, None])
            sum_exp = torch.stack([zs.exp().sum(dim=-1), zt.exp().sum(dim=-1)])
            all_reduce_(sum_exp, dist.ReduceOp.SUM, tp_group)
            log_z = sum_exp.log()
            lse[:, sl] = m + log_z
            ls, lt = zs.sub_(log_z[0, :, None]), zt.sub_(log_z[1, :, None])
            e, u, s, h = _terms(ls, lt, beta, clip)
            sums = torch.stack([e.sum(dim=-1), _gradient_sum(u, s, h, beta)])
            all_reduce_(sums, dist.ReduceOp.SUM, tp_group)
            out[sl], g_sum[sl] = sums[0], sums[1]
        ctx.save_for_backward(student, teacher, lse, g_sum)
        ctx.beta, ctx.temperature, ctx.chunk_size, ctx.clip = beta, temperature, chunk_size, clip
        ctx.t_temperature = t_temperature
        return out.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, lse, g_sum = ctx.saved_tensors
        s_rows, t_rows = as_rows(student), as_rows(teacher)
        beta, temperature = ctx.beta, ctx.temperature
        g = upstream_per_row(grad_output, temperature)
        grad = torch.empty(s_rows.shape, dtype=student.dtype, device=student.device)
        with torch.no_grad():
            for sl in chunks(s_rows.shape[0], ctx.chunk_size):
                ls = scaled_fp32(s_rows[sl], temperature).sub_(lse[0, sl, None])
                lt = scaled_fp32(t_rows[sl], ctx.t_temperature).sub_(lse[1, sl, None])
                _, u, s, h = _terms(ls, lt, beta, ctx.clip)
                del ls, lt
                G = g_sum[sl, None]
                if beta == 0.0:
                    w = h if u is None else h * u
                    d = s.mul_(G).sub_(w)
                else:
                    w = h if u is None else torch.where(u, h, torch.zeros_like(h))
                    d = zero_where_nan_(w.sub_(G).mul_(s))
                    if beta != 1.0:
                        d.mul_(1.0 - beta)
                gs = g[sl]
                d.mul_(gs).masked_fill_(gs == 0, 0.0)
                grad[sl] = d
        return grad.view(student.shape), None, None, None, None, None, None, None


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    pointwise_clip: float | None = None,
    teacher_temperature: float | None = None,
) -> torch.Tensor:
    """Generalised JSD per token between vocab-parallel student and teacher logits.

    Args:
        student_logits: ``[..., v/tp]`` this rank's shard, bf16 or fp32.
        teacher_logits: Same shape; treated as a constant.
        beta: In ``[0, 1]``; 0 = forward KL(p_t||p_s), 1 = reverse KL(p_s||p_t),
            in between the TRL/GKD generalised JSD (see module docstring).
        tp_group: Tensor-parallel group; None = no TP.
        temperature: Softmax temperature (> 0) of the student, and of the teacher
            unless ``teacher_temperature`` is given.
        chunk_size: Tokens processed at a time; None = the device default
            (``vocab_shard.resolve_chunk_size``).
        pointwise_clip: If set, each vocabulary entry's term is clamped at this
            value before the sum (clamped entries pass no gradient).
        teacher_temperature: The teacher's temperature; None = ``temperature``.

    Returns:
        ``[...]`` fp32 divergence per token, differentiable w.r.t. the student logits.
    """
    check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    t_temperature = resolve_teacher_temperature(teacher_temperature, temperature)
    chunk_size = resolve_chunk_size(chunk_size, student_logits)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    if pointwise_clip is not None and not pointwise_clip > 0:
        raise ValueError(f"pointwise_clip must be > 0 or None, got {pointwise_clip!r}")
    return _GeneralizedJSD.apply(
        student_logits,
        teacher_logits.detach(),
        float(beta),
        tp_group,
        float(temperature),
        chunk_size,
        None if pointwise_clip is None else float(pointwise_clip),
        t_temperature,
    )
