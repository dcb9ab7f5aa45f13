"""Triton kernels for ``full_vocab_kl`` and ``log_probs_kl_entropy``: one pass each way.

The PyTorch path (``vocab_parallel``) makes about a dozen fp32 passes over
``[chunk, v/tp]`` per chunk; here every row of the local vocabulary shard is
read once forward and once backward, in blocks of ``block_v`` entries,
accumulating in fp32 from bf16/fp32 input (``z_s = student / T``, ``z_t = teacher / T_t``;
``T_t = T`` unless a separate teacher temperature is given).

Forward, one program per row, online (block-wise) max rescaling::

    m_s = max z_s      S_s = sum e^(z_s - m_s)      m_t = max z_t    S_t = sum e^(z_t - m_t)
    A   = sum e^(z_s - m_s) (z_s - z_t)             E = sum e^(z_s - m_s) (z_s - m_s)

``E`` only for ``log_probs_kl_entropy``. The ``[k, n]`` per-row statistics of
the ``tp`` shards are all-gathered (``k * n`` floats per rank; no collective
without TP) and combined exactly by rescaling to the global maxima, then::

    KL = A / S_s - (M_s - M_t) - log S_s + log S_t     H = log S_s - E / S_s
    log p(target) = z_target - M_s - log S_s

Every rank combines the same gathered numbers in the same order, so the values
are bitwise identical across ranks. Backward, one program per (row, block),
reads the student and teacher blocks and writes
``p_s (log p_s - log p_t - KL) g / T`` (plus ``g_lp (onehot - p_s) / T`` in the
fused op) in the logits' dtype, optionally into the student logits' storage.
Masked (``-inf``) entries follow ``vocab_parallel``: zero contribution, never
NaN; teacher ``-inf`` where the student has mass gives ``KL = +inf``.

Kernels (and Triton's own library) are decorated at import, so Triton's CPU
interpreter applies only when ``TRITON_INTERPRET=1`` is set before ``triton`` is
first imported (the unit tests do that in fresh processes). GPU speed is
measured by ``benchmarks/bench_vocab_parallel_kl.py`` (``project_triton``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from megatron_sdpg.ops.vocab_shard import as_rows, local_targets, shard_rank_and_size, upstream_per_row

BLOCK_V = 4096
"""Vocabulary entries per block: the forward's loop step and each backward program's width."""
NUM_WARPS = 8

_KL_STATS = 5  # m_s, S_s, m_t, S_t, A
_FUSED_STATS = 6  # ... and E


@triton.jit
def _row_stats_kernel(s_ptr, t_ptr, stats_ptr, n_rows, n_cols, s_stride, t_stride, inv_t, inv_t_teacher,
                      WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per-row partial statistics of one vocabulary shard; writes ``stats[k, row]``."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    m_s = float("-inf")
    m_t = float("-inf")
    sum_s = 0.0
    sum_t = 0.0
    a = 0.0
    e = 0.0
    ref_s = 0.0  # m_s where finite, else 0: the shift actually used, so -inf - -inf never occurs
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        zs = tl.load(s_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        zt = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_t_teacher
        new_s = tl.maximum(m_s, tl.max(zs, axis=0))
        new_t = tl.maximum(m_t, tl.max(zt, axis=0))
        new_ref_s = tl.where(new_s == float("-inf"), 0.0, new_s)
        ref_t = tl.where(new_t == float("-inf"), 0.0, new_t)
        scale_s = tl.exp(m_s - new_ref_s)  # 0 while nothing was seen yet
        es = tl.exp(zs - new_ref_s)  # 0 at masked entries
        live = es > 0.0
        if WITH_ENTROPY:  # E relative to the new shift: scale (E + (old - new shift) S_old) + block
            e = scale_s * (e + (ref_s - new_ref_s) * sum_s) \
                + tl.sum(tl.where(live, es * (zs - new_ref_s), 0.0), axis=0)
        sum_s = sum_s * scale_s + tl.sum(es, axis=0)
        sum_t = sum_t * tl.exp(m_t - ref_t) + tl.sum(tl.exp(zt - ref_t), axis=0)
        # zs - zt is -inf or NaN only where es == 0 (masked student); +inf (masked
        # teacher where the student has mass) is kept: the KL is then +inf.
        a = tl.where(scale_s > 0.0, a * scale_s, 0.0) + tl.sum(tl.where(live, es * (zs - zt), 0.0), axis=0)
        m_s, m_t, ref_s = new_s, new_t, new_ref_s
    tl.store(stats_ptr + row, m_s)
    tl.store(stats_ptr + n_rows + row, sum_s)
    tl.store(stats_ptr + 2 * n_rows + row, m_t)
    tl.store(stats_ptr + 3 * n_rows + row, sum_t)
    tl.store(stats_ptr + 4 * n_rows + row, a)
    if WITH_ENTROPY:
        tl.store(stats_ptr + 5 * n_rows + row, e)


@triton.jit
def _grad_block(s_ptr, t_ptr, lse_s_ptr, t_shift_ptr, n_cols, s_stride, t_stride, inv_t, inv_t_teacher,
                BLOCK_V: tl.constexpr):
    """This program's block of one row: ``(row, cols, valid, log p_s, log p_s - log p_t - KL)``.

    ``log p_t + KL = z_t - (lse_t - KL)``, the shift the forward stored per row.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < n_cols
    zs = tl.load(s_ptr + row * s_stride + cols, mask=valid, other=0.0).to(tl.float32) * inv_t
    zt = tl.load(t_ptr + row * t_stride + cols, mask=valid, other=0.0).to(tl.float32) * inv_t_teacher
    log_ps = zs - tl.load(lse_s_ptr + row)
    return row, cols, valid, log_ps, log_ps - (zt - tl.load(t_shift_ptr + row))


@triton.jit
def _kl_grad_kernel(s_ptr, t_ptr, grad_ptr, lse_s_ptr, t_shift_ptr, g_ptr, n_cols, s_stride, t_stride,
                    grad_stride, inv_t, inv_t_teacher, BLOCK_V: tl.constexpr):
    """``grad = p_s (log p_s - log p_t - KL) g`` on one block of one row (``g`` already / T)."""
    row, cols, valid, log_ps, d = _grad_block(s_ptr, t_ptr, lse_s_ptr, t_shift_ptr, n_cols, s_stride, t_stride,
                                              inv_t, inv_t_teacher, BLOCK_V)
    r = tl.exp(log_ps) * tl.load(g_ptr + row) * d
    r = tl.where(r == r, r, 0.0)  # NaN (0 * inf, or undefined) only where p_s == 0 or g == 0
    tl.store(grad_ptr + row * grad_stride + cols, r.to(grad_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _fused_grad_kernel(s_ptr, t_ptr, grad_ptr, lse_s_ptr, t_shift_ptr, g_kl_ptr, g_lp_ptr, target_ptr,
                       n_cols, s_stride, t_stride, grad_stride, inv_t, inv_t_teacher, BLOCK_V: tl.constexpr):
    """``grad = [g_kl p_s (log p_s - log p_t - KL) + g_lp (onehot - p_s)]`` (``g`` already / T)."""
    row, cols, valid, log_ps, d = _grad_block(s_ptr, t_ptr, lse_s_ptr, t_shift_ptr, n_cols, s_stride, t_stride,
                                              inv_t, inv_t_teacher, BLOCK_V)
    g_lp = tl.load(g_lp_ptr + row)
    d = tl.load(g_kl_ptr + row) * d
    # Non-finite only where p_s == 0 (then multiplied by 0), where g_kl == 0 and the
    # KL is infinite (the KL part is 0), or where the gradient is undefined.
    d = tl.where((d == d) & (tl.abs(d) < float("inf")), d, 0.0)
    r = (d - g_lp) * tl.exp(log_ps)
    r += tl.where(cols == tl.load(target_ptr + row), g_lp, 0.0)  # target -1: not in this shard
    tl.store(grad_ptr + row * grad_stride + cols, r.to(grad_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------- host side


def _unit_stride(rows: torch.Tensor) -> torch.Tensor:
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _row_stats(s_rows, t_rows, temperature, t_temperature, with_entropy, block_v, extra_rows=0) -> torch.Tensor:
    """``[k + extra_rows, n]`` fp32 per-row statistics of this shard (see the module docstring).

    The ``extra_rows`` last rows are left for the caller to fill.
    """
    n, v = s_rows.shape
    k = _FUSED_STATS if with_entropy else _KL_STATS
    stats = torch.empty(k + extra_rows, n, dtype=torch.float32, device=s_rows.device)
    if n:
        _row_stats_kernel[(n,)](s_rows, t_rows, stats, n, v, s_rows.stride(0), t_rows.stride(0),
                                1.0 / temperature, 1.0 / t_temperature, WITH_ENTROPY=with_entropy, BLOCK_V=block_v,
                                num_warps=NUM_WARPS)
    return stats


def _combine(stats: torch.Tensor, tp_group) -> dict[str, torch.Tensor]:
    """Exact whole-vocabulary statistics from every shard's ``[k, n]`` partials.

    Each shard's sums are rescaled from its own maximum to the global one
    (``e^(m_r - M)``); a shard that is ``-inf`` on a row contributes 0.

    Returns:
        ``[n]`` fp32 tensors: ``kl``, ``lse_s``, ``lse_t`` and, for the fused
        statistics (entropy row and the predicted logit ``z_target``, 0 on the
        shards that do not hold the target), ``entropy`` and ``log_prob``.
    """
    _, world = shard_rank_and_size(tp_group)
    if world > 1:
        parts = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(parts, stats.contiguous(), group=tp_group)
        gathered = torch.stack(parts)
    else:
        gathered = stats[None]
    m_s, sum_s, m_t, sum_t, a = gathered[:, :_KL_STATS].unbind(1)
    big_s, big_t = m_s.amax(0), m_t.amax(0)
    big_s = torch.where(torch.isfinite(big_s), big_s, torch.zeros_like(big_s))
    big_t = torch.where(torch.isfinite(big_t), big_t, torch.zeros_like(big_t))
    w_s, w_t = torch.exp(m_s - big_s), torch.exp(m_t - big_t)  # [tp, n]; 0 for an all -inf shard row
    zero = torch.zeros_like(w_s)
    total_s, total_t = (sum_s * w_s).sum(0), (sum_t * w_t).sum(0)
    total_a = torch.where(w_s > 0, a * w_s, zero).sum(0)
    log_z_s, log_z_t = total_s.log(), total_t.log()
    out = dict(kl=total_a / total_s - (big_s - big_t) - log_z_s + log_z_t,
               lse_s=big_s + log_z_s, lse_t=big_t + log_z_t)
    if stats.shape[0] > _KL_STATS:
        ref_s = torch.where(torch.isfinite(m_s), m_s, zero)  # the shift each shard's E used
        total_e = torch.where(w_s > 0, w_s * (gathered[:, 5] + (ref_s - big_s) * sum_s), zero).sum(0)
        out["entropy"] = log_z_s - total_e / total_s
        out["log_prob"] = gathered[:, 6].sum(0) - out["lse_s"]
    return out


class _TritonFullVocabKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, tp_group, temperature, inplace_backward, block_v, t_temperature):
        s_rows, t_rows = _unit_stride(as_rows(student)), _unit_stride(as_rows(teacher))
        stats = _combine(_row_stats(s_rows, t_rows, temperature, t_temperature, False, block_v), tp_group)
        kl = stats["kl"]
        ctx.save_for_backward(student, teacher, stats["lse_s"], stats["lse_t"] - kl)
        ctx.temperature, ctx.inplace, ctx.block_v = temperature, inplace_backward, block_v
        ctx.t_temperature = t_temperature
        return kl.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, lse_s, t_shift = ctx.saved_tensors
        s_rows, t_rows = _unit_stride(as_rows(student)), _unit_stride(as_rows(teacher))
        grad = _grad_buffer(student, s_rows, ctx.inplace)
        n, v = s_rows.shape
        if n and v:
            g = upstream_per_row(grad_output, ctx.temperature)
            _kl_grad_kernel[(n, triton.cdiv(v, ctx.block_v))](
                s_rows, t_rows, grad, lse_s, t_shift, g, v, s_rows.stride(0), t_rows.stride(0), grad.stride(0),
                1.0 / ctx.temperature, 1.0 / ctx.t_temperature, BLOCK_V=ctx.block_v, num_warps=NUM_WARPS)
        return grad.view(student.shape), None, None, None, None, None, None


class _TritonLogProbsKLEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, target, tp_group, temperature, inplace_backward, block_v, t_temperature):
        s_rows, t_rows = _unit_stride(as_rows(student)), _unit_stride(as_rows(teacher))
        n, v = s_rows.shape
        local, in_shard = local_targets(target, n, v, tp_group)
        partial = _row_stats(s_rows, t_rows, temperature, t_temperature, True, block_v, extra_rows=1)
        if n:
            z_target = s_rows.gather(1, local[:, None]).squeeze(1).float() * (1.0 / temperature)
            partial[-1] = torch.where(in_shard, z_target, torch.zeros_like(z_target))
        stats = _combine(partial, tp_group)
        kl, ent = stats["kl"], stats["entropy"]
        target_or_none = torch.where(in_shard, local, torch.full_like(local, -1))
        ctx.save_for_backward(student, teacher, target_or_none, stats["lse_s"], stats["lse_t"] - kl)
        ctx.temperature, ctx.inplace, ctx.block_v = temperature, inplace_backward, block_v
        ctx.t_temperature = t_temperature
        ctx.mark_non_differentiable(ent)
        shape = student.shape[:-1]
        return stats["log_prob"].view(shape), kl.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_log_probs, g_kl, _g_entropy):
        student, teacher, target, lse_s, t_shift = ctx.saved_tensors
        s_rows, t_rows = _unit_stride(as_rows(student)), _unit_stride(as_rows(teacher))
        grad = _grad_buffer(student, s_rows, ctx.inplace)
        n, v = s_rows.shape
        if n and v:
            zeros = torch.zeros(n, device=student.device)
            g_lp = upstream_per_row(g_log_probs if g_log_probs is not None else zeros, ctx.temperature)
            g_kl = upstream_per_row(g_kl if g_kl is not None else zeros, ctx.temperature)
            _fused_grad_kernel[(n, triton.cdiv(v, ctx.block_v))](
                s_rows, t_rows, grad, lse_s, t_shift, g_kl, g_lp, target, v, s_rows.stride(0), t_rows.stride(0),
                grad.stride(0), 1.0 / ctx.temperature, 1.0 / ctx.t_temperature, BLOCK_V=ctx.block_v,
                num_warps=NUM_WARPS)
        return grad.view(student.shape), None, None, None, None, None, None, None


def _grad_buffer(student: torch.Tensor, s_rows: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The gradient's storage: the student logits themselves (in place) or a new buffer.

    In place, the student's version counter is bumped as a PyTorch in-place op
    would (the kernel's write is invisible to autograd), so another node that
    saved the student logits fails loudly instead of reading the gradient.
    """
    if inplace and student.is_contiguous():
        increment_version(student)
        return s_rows  # each block is read before the same program overwrites it
    return torch.empty(s_rows.shape, dtype=student.dtype, device=student.device)


def triton_full_vocab_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    block_v: int | None = None,
    teacher_temperature: float | None = None,
) -> torch.Tensor:
    """``vocab_parallel.full_vocab_kl`` with the Triton kernels (same arguments and result).

    Args:
        student_logits: ``[..., v/tp]`` this rank's shard, bf16 or fp32, on a Triton
            device (or any device under ``TRITON_INTERPRET=1``).
        teacher_logits: Same shape; treated as a constant.
        tp_group: Tensor-parallel group; None = no TP.
        temperature: Softmax temperature (> 0) of the student, and of the teacher
            unless ``teacher_temperature`` is given.
        inplace_backward: Write the gradient into the student logits' storage.
        block_v: Vocabulary entries per block (a power of two), forward and
            backward; None = ``BLOCK_V``.
        teacher_temperature: The teacher's temperature; None = ``temperature``.

    Returns:
        ``[...]`` fp32 KL per token, identical on every TP rank.
    """
    t_temperature = float(temperature if teacher_temperature is None else teacher_temperature)
    return _TritonFullVocabKL.apply(student_logits, teacher_logits.detach(), tp_group, float(temperature),
                                    inplace_backward, block_v or BLOCK_V, t_temperature)


def triton_log_probs_kl_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    block_v: int | None = None,
    teacher_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``vocab_parallel_fused.log_probs_kl_entropy`` with the Triton kernels.

    Args: as ``triton_full_vocab_kl``, plus ``target`` ``[...]`` GLOBAL token ids.

    Returns:
        ``(log p_s(target), KL, entropy)``, three ``[...]`` fp32 tensors; the
        entropy is not differentiable.
    """
    t_temperature = float(temperature if teacher_temperature is None else teacher_temperature)
    return _TritonLogProbsKLEntropy.apply(student_logits, teacher_logits.detach(), target, tp_group,
                                          float(temperature), inplace_backward, block_v or BLOCK_V, t_temperature)
