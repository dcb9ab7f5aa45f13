"""Log-probs, reverse KL and entropy of the student in one pass over the vocabulary shard.

The SDPG loss needs, per token, ``log p_s(target)`` (policy-gradient term),
``KL(p_s || p_t)`` (distillation term) and the entropy (a metric). Computing
them with three separate ops reads the logits three times forward and writes two
logits-sized gradients that autograd then adds. ``log_probs_kl_entropy`` shares
the student's max and sum-exp, issues two collectives per chunk (MAX of both
maxima; SUM of sum-exps, the KL and entropy partial sums and the predicted
logit) and writes one gradient::

    dL/dz = [ g_kl * p_s (log p_s - log p_t - KL) + g_lp * (onehot(target) - p_s) ] / T

The entropy output is a detached metric (no gradient). Conventions (shards,
dtypes, masked logits, ``inplace_backward``, ``backend``) are those of
``vocab_parallel``; on CUDA the Triton kernels of ``vocab_parallel_triton`` run
instead of the chunked path below.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sdpg.ops.vocab_shard import (
    all_reduce_,
    as_rows,
    check_pair,
    check_temperature,
    chunks,
    local_targets,
    resolve_chunk_size,
    resolve_teacher_temperature,
    row_max,
    scaled_minus,
    upstream_per_row,
    use_triton,
)


class _LogProbsKLEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, target, tp_group, temperature, chunk_size, inplace_backward, t_temperature):
        s_rows, t_rows = as_rows(student), as_rows(teacher)
        n, v = s_rows.shape
        local, in_shard = local_targets(target, n, v, tp_group)
        f32 = dict(dtype=torch.float32, device=s_rows.device)
        log_probs, kl, ent = (torch.empty(n, **f32) for _ in range(3))
        lse = torch.empty(2, n, **f32)
        a, b, e = (torch.empty(min(n, chunk_size), v, **f32) for _ in range(3))
        for sl in chunks(n, chunk_size):
            c = sl.stop - sl.start
            m = torch.stack([row_max(s_rows[sl], temperature), row_max(t_rows[sl], t_temperature)])
            all_reduce_(m, dist.ReduceOp.MAX, tp_group)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            predicted = s_rows[sl].gather(1, local[sl, None]).squeeze(1).float().div_(temperature).sub_(m[0])
            predicted = torch.where(in_shard[sl], predicted, torch.zeros_like(predicted))
            zs = scaled_minus(s_rows[sl], temperature, m[0], a[:c])  # z_s - max_s
            diff = scaled_minus(t_rows[sl], t_temperature, m[1], b[:c])  # z_t - max_t
            es = e[:c]
            sum_exp_t = torch.exp(diff, out=es).sum(dim=-1)
            torch.sub(zs, diff, out=diff)  # zs' - zt'
            sum_exp_s = torch.exp(zs, out=es).sum(dim=-1)
            # NaN only from 0 * inf at masked entries, which count 0.
            kl_partial = diff.mul_(es).nansum(dim=-1)
            ent_partial = zs.mul_(es).nansum(dim=-1)
            sums = torch.stack([sum_exp_s, sum_exp_t, kl_partial, ent_partial, predicted])
            all_reduce_(sums, dist.ReduceOp.SUM, tp_group)
            log_z = sums[:2].log()
            kl[sl] = sums[2] / sums[0] - log_z[0] + log_z[1]
            ent[sl] = log_z[0] - sums[3] / sums[0]
            log_probs[sl] = sums[4] - log_z[0]
            lse[:, sl] = m + log_z
        del a, b, e
        ctx.save_for_backward(student, teacher, local, in_shard, lse, kl)
        ctx.temperature, ctx.chunk_size, ctx.inplace = temperature, chunk_size, inplace_backward
        ctx.t_temperature = t_temperature
        ctx.mark_non_differentiable(ent)
        shape = student.shape[:-1]
        return log_probs.view(shape), kl.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_log_probs, g_kl, _g_entropy):
        student, teacher, local, in_shard, lse, kl = ctx.saved_tensors
        s_rows, t_rows = as_rows(student), as_rows(teacher)
        n, v = s_rows.shape
        temperature = ctx.temperature
        g_lp = upstream_per_row(g_log_probs if g_log_probs is not None else torch.zeros(n), temperature)
        g_kl = upstream_per_row(g_kl if g_kl is not None else torch.zeros(n), temperature)
        g_lp, g_kl = g_lp.to(student.device), g_kl.to(student.device)
        if ctx.inplace and student.is_contiguous():
            grad = s_rows  # each chunk is read before it is overwritten
        else:
            grad = torch.empty(s_rows.shape, dtype=student.dtype, device=student.device)
        t_shift = lse[1] - kl
        a, b = (torch.empty(min(n, ctx.chunk_size), v, dtype=torch.float32, device=student.device) for _ in range(2))
        with torch.no_grad():
            for sl in chunks(n, ctx.chunk_size):
                c = sl.stop - sl.start
                log_ps = scaled_minus(s_rows[sl], temperature, lse[0, sl], a[:c])
                d = scaled_minus(t_rows[sl], ctx.t_temperature, t_shift[sl], b[:c])
                torch.sub(log_ps, d, out=d).mul_(g_kl[sl])  # g_kl (log p_s - log p_t - KL)
                # Non-finite only where p_s == 0 (then multiplied by 0), where g_kl == 0 and
                # the KL is infinite (the KL part is 0), or where the gradient is undefined.
                torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
                d.sub_(g_lp[sl]).mul_(log_ps.exp_())
                d.scatter_add_(1, local[sl, None], g_lp[sl] * in_shard[sl, None])
                grad[sl] = d
        return grad.view(student.shape), None, None, None, None, None, None, None


def log_probs_kl_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
    backend: str | None = None,
    teacher_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p_s(target), KL(p_s || p_t), H(p_s))`` per token in one fused pass.

    Args:
        student_logits: ``[..., v/tp]`` this rank's shard, bf16 or fp32.
        teacher_logits: Same shape; treated as a constant (stop-gradient).
        target: ``[...]`` GLOBAL token ids.
        tp_group: Tensor-parallel group; None = no TP.
        temperature: Softmax temperature (> 0) of the student, and of the teacher
            unless ``teacher_temperature`` is given.
        chunk_size: Tokens processed at a time (PyTorch path only); None = the device
            default (``vocab_shard.resolve_chunk_size``).
        inplace_backward: Write the gradient into the student logits' storage
            (see ``full_vocab_kl``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``full_vocab_kl``).
        teacher_temperature: The teacher's temperature; None = ``temperature``.

    Returns:
        Three ``[...]`` fp32 tensors; the first two are differentiable w.r.t. the
        student logits, the entropy is not.
    """
    check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    t_temperature = resolve_teacher_temperature(teacher_temperature, temperature)
    chunk_size = resolve_chunk_size(chunk_size, student_logits)
    if use_triton(student_logits, backend):
        from megatron_sdpg.ops.vocab_parallel_triton import triton_log_probs_kl_entropy

        return triton_log_probs_kl_entropy(student_logits, teacher_logits, target, tp_group, temperature,
                                           inplace_backward, teacher_temperature=t_temperature)
    return _LogProbsKLEntropy.apply(
        student_logits, teacher_logits.detach(), target, tp_group, float(temperature), chunk_size, inplace_backward,
        t_temperature,
    )
