"""Exact full-vocabulary statistics of vocab-parallel logits, never gathering the vocabulary.

Every function takes logits sharded on the last dimension across ``tp_group``
(rank ``r`` of ``tp`` holds global ids ``[r * V/tp, (r + 1) * V/tp)``;
``tp_group=None`` means no tensor parallelism), with free leading dimensions
(``[s, b, v/tp]`` or ``[t, v/tp]``), bf16 or fp32. Work is done in fp32 on chunks of
``chunk_size`` tokens, so the extra memory is one gradient buffer plus a few
``[chunk, v/tp]`` fp32 buffers whatever the sequence length. Results are fp32
per-token tensors of the leading shape; gradients have the logits' dtype.

Collectives per chunk, each on per-token ``[k, chunk]`` fp32 statistics only:

- ``token_log_probs``: all-reduce(MAX) of the shard maxima, then one
  all-reduce(SUM) of (sum-exp, predicted logit);
- ``entropy``: MAX, then SUM of (sum-exp, sum of exp * logit);
- ``full_vocab_kl``: MAX of both maxima, then SUM of (student sum-exp, teacher
  sum-exp, sum of exp(student) * (student - teacher));
- ``generalized_jsd`` (``vocab_parallel_jsd``): MAX, SUM of sum-exps, SUM of the
  per-token divergence terms (the mixture needs normalised log-probs first);
- ``log_probs_kl_entropy`` (``vocab_parallel_fused``): the SDPG loss's three
  statistics in one pass: MAX, then one SUM.

On CUDA tensors ``full_vocab_kl`` and ``log_probs_kl_entropy`` run one-pass
Triton kernels instead when triton is installed (``vocab_parallel_triton``: one
read of each row forward, one read and one write backward, and one all-gather of
``[k, n]`` per-row statistics); ``backend=`` or ``$MEGATRON_SDPG_VOCAB_BACKEND``
(``auto``, ``torch``, ``triton``) chooses. Everything else is chunked PyTorch.

Backward passes issue no collective: forward saves the inputs (references, no
copy) and per-token fp32 statistics (log-sum-exp, the value), recomputes the
softmax per chunk and writes the gradient into one preallocated output.

Masked logits (``-inf``) are supported: a zero-probability entry contributes 0,
never NaN. In ``full_vocab_kl`` a token where the teacher is ``-inf`` but the
student is not has KL ``+inf`` (and an undefined gradient, which is set to 0
wherever the upstream gradient is 0, e.g. after the loss clamps the KL or masks
the token). Rows that are ``-inf`` on the whole vocabulary are undefined.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sdpg.ops.vocab_parallel_fused import log_probs_kl_entropy
from megatron_sdpg.ops.vocab_parallel_jsd import generalized_jsd
from megatron_sdpg.ops.vocab_shard import (
    all_reduce_,
    as_rows,
    check_pair,
    check_temperature,
    chunks,
    global_max,
    local_targets,
    resolve_chunk_size,
    resolve_teacher_temperature,
    row_max,
    scaled_fp32,
    scaled_minus,
    upstream_per_row,
    use_triton,
    zero_where_nan_,
)

__all__ = [
    "token_log_probs", "entropy", "full_vocab_kl", "generalized_jsd", "log_probs_kl_entropy", "is_greedy_token",
]


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, temperature, chunk_size):
        rows = as_rows(logits)
        n, v = rows.shape
        local, in_shard = local_targets(target, n, v, tp_group)
        out = torch.empty(n, dtype=torch.float32, device=rows.device)
        lse = torch.empty(n, dtype=torch.float32, device=rows.device)
        buf = torch.empty(min(n, chunk_size), v, dtype=torch.float32, device=rows.device)
        for sl in chunks(n, chunk_size):
            m = row_max(rows[sl], temperature)
            all_reduce_(m, dist.ReduceOp.MAX, tp_group)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            predicted = rows[sl].gather(1, local[sl, None]).squeeze(1).float().div_(temperature).sub_(m)
            predicted = torch.where(in_shard[sl], predicted, torch.zeros_like(predicted))
            sum_exp = scaled_minus(rows[sl], temperature, m, buf[: sl.stop - sl.start]).exp_().sum(dim=-1)
            sums = torch.stack([sum_exp, predicted])
            all_reduce_(sums, dist.ReduceOp.SUM, tp_group)
            log_z = sums[0].log()
            lse[sl] = m + log_z
            out[sl] = sums[1] - log_z
        del buf
        ctx.save_for_backward(logits, local, in_shard, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        logits, local, in_shard, lse = ctx.saved_tensors
        rows = as_rows(logits)
        n, v = rows.shape
        g = upstream_per_row(grad_output, ctx.temperature)
        grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        buf = torch.empty(min(n, ctx.chunk_size), v, dtype=torch.float32, device=logits.device)
        with torch.no_grad():
            for sl in chunks(n, ctx.chunk_size):
                p = scaled_minus(rows[sl], ctx.temperature, lse[sl], buf[: sl.stop - sl.start]).exp_()
                p.mul_(-g[sl])
                # d log p_target / dz = onehot(target) - p, on the shard that owns the target.
                p.scatter_add_(1, local[sl, None], g[sl] * in_shard[sl, None])
                grad[sl] = p
        return grad.view(logits.shape), None, None, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tp_group, temperature, chunk_size):
        rows = as_rows(logits)
        n = rows.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=rows.device)
        lse = torch.empty(n, dtype=torch.float32, device=rows.device)
        for sl in chunks(n, chunk_size):
            z = scaled_fp32(rows[sl], temperature)
            m = global_max([z], tp_group)[0]
            z.sub_(m[:, None])
            e = z.exp()
            sums = torch.stack([e.sum(dim=-1), zero_where_nan_(z.mul_(e)).sum(dim=-1)])
            all_reduce_(sums, dist.ReduceOp.SUM, tp_group)
            # H = log Z - sum(e * z') / Z with z' = z - max, Z = sum(e).
            lse[sl] = m + sums[0].log()
            out[sl] = sums[0].log() - sums[1] / sums[0]
        ctx.save_for_backward(logits, lse, out)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        logits, lse, ent = ctx.saved_tensors
        rows = as_rows(logits)
        g = upstream_per_row(grad_output, ctx.temperature)
        grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        with torch.no_grad():
            for sl in chunks(rows.shape[0], ctx.chunk_size):
                logp = scaled_fp32(rows[sl], ctx.temperature).sub_(lse[sl, None])
                p = logp.exp()
                # dH/dz = -p * (log p + H)
                d = zero_where_nan_(logp.add_(ent[sl, None]).mul_(p)).mul_(-g[sl])
                grad[sl] = d
        return grad.view(logits.shape), None, None, None


class _FullVocabKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, tp_group, temperature, chunk_size, inplace_backward, t_temperature):
        s_rows, t_rows = as_rows(student), as_rows(teacher)
        n, v = s_rows.shape
        f32 = dict(dtype=torch.float32, device=s_rows.device)
        kl = torch.empty(n, **f32)
        lse = torch.empty(2, n, **f32)
        a, b, e = (torch.empty(min(n, chunk_size), v, **f32) for _ in range(3))
        for sl in chunks(n, chunk_size):
            c = sl.stop - sl.start
            m = torch.stack([row_max(s_rows[sl], temperature), row_max(t_rows[sl], t_temperature)])
            all_reduce_(m, dist.ReduceOp.MAX, tp_group)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            zs = scaled_minus(s_rows[sl], temperature, m[0], a[:c])  # z_s - max_s
            zt = scaled_minus(t_rows[sl], t_temperature, m[1], b[:c])  # z_t - max_t
            es = e[:c]
            sum_exp_t = torch.exp(zt, out=es).sum(dim=-1)
            sum_exp_s = torch.exp(zs, out=es).sum(dim=-1)
            # sum_v e_s * (zs' - zt'); NaN only from 0 * inf at masked entries, which count 0.
            partial = torch.sub(zs, zt, out=zt).mul_(es).nansum(dim=-1)
            sums = torch.stack([sum_exp_s, sum_exp_t, partial])
            all_reduce_(sums, dist.ReduceOp.SUM, tp_group)
            log_z = sums[:2].log()
            # KL = sum p_s (zs' - zt') - log Z_s + log Z_t
            kl[sl] = sums[2] / sums[0] - log_z[0] + log_z[1]
            lse[:, sl] = m + log_z
        del a, b, e
        ctx.save_for_backward(student, teacher, lse, kl)
        ctx.temperature, ctx.chunk_size, ctx.inplace = temperature, chunk_size, inplace_backward
        ctx.t_temperature = t_temperature
        return kl.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, lse, kl = ctx.saved_tensors
        s_rows, t_rows = as_rows(student), as_rows(teacher)
        n, v = s_rows.shape
        g = upstream_per_row(grad_output, ctx.temperature)
        if ctx.inplace and student.is_contiguous():
            grad = s_rows  # each chunk is read before it is overwritten
        else:
            grad = torch.empty(s_rows.shape, dtype=student.dtype, device=student.device)
        # log p_s - log p_t - KL = log p_s - (z_t / T - (lse_t - KL))
        t_shift = lse[1] - kl
        a, b = (torch.empty(min(n, ctx.chunk_size), v, dtype=torch.float32, device=student.device) for _ in range(2))
        with torch.no_grad():
            for sl in chunks(n, ctx.chunk_size):
                c = sl.stop - sl.start
                log_ps = scaled_minus(s_rows[sl], ctx.temperature, lse[0, sl], a[:c])
                d = scaled_minus(t_rows[sl], ctx.t_temperature, t_shift[sl], b[:c])
                torch.sub(log_ps, d, out=d)
                p_g = log_ps.exp_().mul_(g[sl])
                # dKL/dz = p * (log p - log q - KL); NaN (0 * inf) only where p == 0 or g == 0.
                zero_where_nan_(torch.mul(d, p_g, out=grad[sl]))
        return grad.view(student.shape), None, None, None, None, None, None


def token_log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of ``target`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., v/tp]`` this rank's vocabulary shard, bf16 or fp32.
        target: ``[...]`` GLOBAL token ids in ``[0, V)`` (padding tokens must
            hold some valid id; their values are simply not used by the loss).
        tp_group: Tensor-parallel group the vocabulary is split over; None = no TP.
        temperature: Softmax temperature (> 0).
        chunk_size: Tokens processed at a time; None = the device default
            (``vocab_shard.resolve_chunk_size``).

    Returns:
        ``[...]`` fp32, identical on every TP rank. Differentiable w.r.t. ``logits``:
        ``d/dz = (onehot(target) - p) / temperature``.
    """
    check_temperature(temperature)
    chunk_size = resolve_chunk_size(chunk_size, logits)
    return _TokenLogProbs.apply(logits, target, tp_group, float(temperature), chunk_size)


def entropy(
    logits: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy ``-sum_v p log p`` of ``softmax(logits / temperature)`` per token.

    Args:
        logits: ``[..., v/tp]`` this rank's vocabulary shard, bf16 or fp32.
        tp_group: Tensor-parallel group; None = no TP.
        temperature: Softmax temperature (> 0).
        chunk_size: Tokens processed at a time; None = the device default
            (``vocab_shard.resolve_chunk_size``).

    Returns:
        ``[...]`` fp32. Differentiable: ``dH/dz = -p (log p + H) / temperature``.
    """
    check_temperature(temperature)
    chunk_size = resolve_chunk_size(chunk_size, logits)
    return _Entropy.apply(logits, tp_group, float(temperature), chunk_size)


def full_vocab_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
    backend: str | None = None,
    teacher_temperature: float | None = None,
) -> torch.Tensor:
    """Exact reverse KL ``sum_v p_s (log p_s - log p_t)`` over the whole vocabulary.

    ``p_s = softmax(student / T)``, ``p_t = softmax(teacher / T_t)``. The teacher is
    treated as a constant (stop-gradient): no gradient flows to ``teacher_logits``.

    Args:
        student_logits: ``[..., v/tp]`` this rank's shard, bf16 or fp32.
        teacher_logits: Same shape; any dtype.
        tp_group: Tensor-parallel group; None = no TP.
        temperature: Softmax temperature (> 0) of the student, and of the teacher
            unless ``teacher_temperature`` is given.
        chunk_size: Tokens processed at a time (PyTorch path only); None = the device
            default (``vocab_shard.resolve_chunk_size``).
        inplace_backward: Write the gradient into ``student_logits``' own storage
            instead of a new buffer (saves one logits-sized buffer). Only valid
            when nothing else reads the student logits afterwards; another
            autograd node that saved them then fails loudly on its version check.
        backend: ``"auto"`` (default: the one-pass Triton kernels of
            ``vocab_parallel_triton`` for CUDA tensors when triton is installed,
            else the chunked PyTorch path), ``"torch"`` or ``"triton"``; None reads
            ``$MEGATRON_SDPG_VOCAB_BACKEND``.
        teacher_temperature: ``T_t`` of the teacher (> 0); None = ``temperature``
            (1.0 scales only the student, as the SDPG authors' code does).

    Returns:
        ``[...]`` fp32 KL per token (``+inf`` where the teacher is ``-inf`` on an
        entry the student gives mass). Gradient w.r.t. the student logits:
        ``p_s (log p_s - log p_t - KL) / T`` times the upstream gradient.
    """
    check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    t_temperature = resolve_teacher_temperature(teacher_temperature, temperature)
    chunk_size = resolve_chunk_size(chunk_size, student_logits)
    if use_triton(student_logits, backend):
        from megatron_sdpg.ops.vocab_parallel_triton import triton_full_vocab_kl

        return triton_full_vocab_kl(student_logits, teacher_logits, tp_group, temperature, inplace_backward,
                                    teacher_temperature=t_temperature)
    return _FullVocabKL.apply(
        student_logits, teacher_logits.detach(), tp_group, float(temperature), chunk_size, inplace_backward,
        t_temperature,
    )



@torch.no_grad()
def is_greedy_token(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Whether ``target`` is a most likely token of ``logits`` (ties count as greedy).

    Temperature does not change the argmax, so it is not a parameter. Used to find
    the first token where a sampled response leaves the teacher's greedy path.

    Args:
        logits: ``[..., v/tp]`` this rank's vocabulary shard, any float dtype.
        target: ``[...]`` GLOBAL token ids in ``[0, V)``.
        tp_group: Tensor-parallel group the vocabulary is split over; None = no TP.

    Returns:
        ``[...]`` bool, identical on every TP rank. Two all-reduces (MAX) of ``[T]``
        fp32 values; no ``[T, V]`` temporary.
    """
    rows = as_rows(logits)
    n, v = rows.shape
    local, in_shard = local_targets(target, n, v, tp_group)
    stats = torch.stack([
        rows.amax(dim=-1).float() if v else rows.new_full((n,), float("-inf"), dtype=torch.float32),
        torch.where(in_shard, rows.gather(1, local[:, None]).squeeze(1).float(),
                    torch.full((n,), float("-inf"), dtype=torch.float32, device=rows.device)),
    ])
    all_reduce_(stats, dist.ReduceOp.MAX, tp_group)
    return (stats[1] >= stats[0]).view(logits.shape[:-1])
