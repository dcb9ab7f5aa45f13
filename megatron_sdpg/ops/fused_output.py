"""The loss's full-vocabulary terms straight from hidden states: no ``[T, V/tp]`` logits.

``fused_output_terms`` takes the student's and the teacher's final hidden states
``[T, h]`` (the response positions), this rank's shard ``[V/tp, h]`` of the
output layer (the column-parallel ``output_layer.weight``, or the word embedding
when embeddings are tied) and the target ids, and returns per token the
student's log-probability of the target, its entropy, the divergence to the
teacher (exact reverse KL, or the forward KL / generalised JSD of
``vocab_parallel_jsd``) and whether the target is the teacher's greedy token.

It works on ``chunk_size`` tokens at a time: per chunk it multiplies the hidden
states by the shard (``[c, h] x [h, V/tp]``), masks the padded vocabulary, and
hands the ``[c, V/tp]`` logits to the vocab-parallel ops of ``vocab_parallel``
and ``vocab_parallel_fused`` (which scale by the temperature in fp32 and issue
their per-token collectives). So at most one chunk of each view's logits exists
at a time, whatever ``T``.

Backward recomputes each chunk's logits, asks those ops for the logits'
gradient ``d`` ``[c, V/tp]`` (fp32; zero on padded entries) and turns it into

- the student hidden states' gradient ``d @ W`` ``[c, h]``, all-reduced (SUM) over
  ``tp_group`` once at the end, as megatron's column-parallel output layer does
  (``copy_to_tensor_model_parallel_region``: identity forward, all-reduce backward);
- the weight shard's gradient ``d^T @ h`` ``[V/tp, h]``, accumulated over chunks in
  fp32 and returned in the weight's dtype (autograd then adds it to any other use
  of the same tensor, e.g. the input embedding when embeddings are tied).

The teacher is a constant: its hidden states and weight get no gradient
(``teacher_weight=None`` uses ``weight`` itself, detached: the current-policy
teacher). The entropy and the greedy flag are metrics without gradient.

Cost: forward does the two views' matmuls, backward recomputes both and adds the
two gradient matmuls: 6 ``T x h x V/tp`` matmuls against the logits path's 4.
With ``eager_loss`` (the loss is a sum of per-token functions of the log-prob and the
divergence, as ``sdpg_loss`` is without the divergence mask) the forward takes each
chunk's gradient right after its statistics, so 4 matmuls and no recompute; the
``[V/tp, h]`` fp32 weight-gradient accumulator then lives from forward to backward.
Backward skips a chunk whose tokens all have zero upstream gradient (padding), and
the teacher's recompute where the divergence's upstream gradient is zero on the
whole chunk (tokens the loss gates out, e.g. non-positive advantages).
Memory beyond the inputs and the two gradients: a few ``[c, V/tp]`` fp32 buffers.
Assumes the full hidden states on every TP rank (no sequence parallelism).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_sdpg.ops.vocab_parallel import entropy, generalized_jsd, is_greedy_token, token_log_probs
from megatron_sdpg.ops.vocab_parallel_fused import log_probs_kl_entropy
from megatron_sdpg.ops.vocab_shard import (
    all_reduce_,
    check_temperature,
    chunks,
    resolve_teacher_temperature,
    shard_rank_and_size,
)

FUSED_CHUNK_TOKENS = 224
"""Default tokens per chunk. Each chunk reads the ``[V/tp, h]`` weight shard three times and
the fp32 weight-gradient accumulator once, so fewer tokens per chunk cost time: on a CPU,
fp32, 110 tokens took 1.61x the logits path's time and 220 tokens 1.08x (eager gradients).
One ``[chunk, V/tp]`` fp32 buffer is then 136 MB at a 151,936-entry shard."""

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


@dataclass
class FusedOutputTerms:
    """Per-token results ``[T]`` of :func:`fused_output_terms` (fp32 unless said).

    Attributes:
        log_probs: ``log p_s(target)``; differentiable.
        divergence: ``D(p_s, p_t)`` per token; differentiable; None without a teacher.
        entropy: ``H(p_s)``; no gradient.
        teacher_greedy: bool, the target is a most likely teacher token (ties count);
            None unless asked for.
    """

    log_probs: torch.Tensor
    divergence: torch.Tensor | None
    entropy: torch.Tensor
    teacher_greedy: torch.Tensor | None


@dataclass(frozen=True)
class _Options:
    """The op's non-tensor arguments, checked (see :func:`fused_output_terms`)."""

    tp_group: dist.ProcessGroup | None
    vocab_size: int | None
    temperature: float
    teacher_temperature: float
    divergence: str
    jsd_beta: float
    pointwise_clip: float | None
    chunk_size: int
    op_chunk_size: int | None
    want_greedy: bool
    eager_loss: Callable | None = None


def resolve_fused_chunk_size(chunk_size: int | None, vocab_local: int) -> int:
    """``chunk_size`` checked, or the default ``FUSED_CHUNK_TOKENS``."""
    if chunk_size is None:
        return FUSED_CHUNK_TOKENS
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _valid_columns(vocab_local: int, vocab_size: int | None, tp_group) -> int:
    """How many of this shard's columns are real vocabulary (the rest is padding)."""
    if vocab_size is None:
        return vocab_local
    rank, _ = shard_rank_and_size(tp_group)
    return max(0, min(vocab_local, vocab_size - rank * vocab_local))


def _logits_chunk(hidden: torch.Tensor, weight: torch.Tensor, n_valid: int, out: torch.Tensor) -> torch.Tensor:
    """``out = hidden @ weight^T`` in fp32 ``[c, V/tp]``, padded columns ``-inf``.

    The product is taken in the inputs' dtype (as the output layer does), then widened.
    """
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(torch.mm(hidden, weight.t()))
    if n_valid < out.shape[1]:
        out[:, n_valid:] = float("-inf")
    return out


def _upstream(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The upstream gradient as fp32 ``[T]`` (zeros when autograd passes None)."""
    return torch.zeros_like(like) if g is None else g.reshape(like.shape).to(like.device, torch.float32)


class _FusedOutputTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, t_hidden, weight, t_weight, target, opts):
        n, v = s_hidden.shape[0], weight.shape[0]
        n_valid = _valid_columns(v, opts.vocab_size, opts.tp_group)
        c_max = min(n, opts.chunk_size)
        f32 = dict(dtype=torch.float32, device=s_hidden.device)
        log_probs, div, ent = (torch.zeros(n, **f32) for _ in range(3))
        greedy = torch.zeros(n if opts.want_greedy else 0, dtype=torch.bool, device=s_hidden.device)
        zs_buf = torch.empty(c_max, v, **f32)
        zt_buf = torch.empty(c_max, v, **f32) if t_hidden is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        eager = opts.eager_loss is not None and (need_h or need_w)
        if eager:
            grad_h = torch.zeros(n, s_hidden.shape[1], **f32) if need_h else None
            grad_w = torch.zeros(v, weight.shape[1], **f32) if need_w else None
            pred = [torch.zeros(n, **f32), torch.zeros(n, **f32) if t_hidden is not None else None]
        for sl in chunks(n, opts.chunk_size):
            c = sl.stop - sl.start
            with torch.no_grad():
                zs = _logits_chunk(s_hidden[sl], weight, n_valid, zs_buf[:c])
                zt = None if t_hidden is None else _logits_chunk(t_hidden[sl], t_weight, n_valid, zt_buf[:c])
                if opts.want_greedy:
                    greedy[sl] = is_greedy_token(zt, target[sl], opts.tp_group)
            if not eager:
                with torch.no_grad():
                    lp, d, e = _chunk_terms(zs, zt, target[sl], opts, with_entropy=True)
                log_probs[sl], ent[sl] = lp, e
                if d is not None:
                    div[sl] = d
                continue
            with torch.enable_grad():
                zs = zs.detach().requires_grad_(True)
                lp, dv, e = _chunk_terms(zs, zt, target[sl], opts, with_entropy=True, inplace_backward=True)
            log_probs[sl], ent[sl] = lp.detach(), e
            if dv is not None:
                div[sl] = dv.detach()
            g_lp, g_dv = _eager_upstream(opts.eager_loss, log_probs, div if dv is not None else None, sl)
            pred[0][sl] = g_lp
            outs, grads = [lp], [g_lp]
            if dv is not None:
                pred[1][sl] = g_dv
                outs.append(dv)
                grads.append(g_dv)
            with torch.enable_grad():
                (d,) = torch.autograd.grad(outs, [zs], grads)
            _add_chunk_grads(d, sl, s_hidden, weight, grad_h, grad_w)
            del d, lp, dv, outs
        del zs_buf, zt_buf
        ctx.eager = None
        if eager:
            if need_h:
                all_reduce_(grad_h, dist.ReduceOp.SUM, opts.tp_group)
            ctx.eager = (grad_h, grad_w, pred)
        ctx.save_for_backward(s_hidden, t_hidden, weight, t_weight, target)
        ctx.opts = opts
        ctx.mark_non_differentiable(ent, greedy)
        if t_hidden is None:
            ctx.mark_non_differentiable(div)
        return log_probs, div, ent, greedy

    @staticmethod
    def backward(ctx, g_log_probs, g_div, _g_ent, _g_greedy):
        s_hidden, t_hidden, weight, t_weight, target = ctx.saved_tensors
        opts = ctx.opts
        n, v = s_hidden.shape[0], weight.shape[0]
        n_valid = _valid_columns(v, opts.vocab_size, opts.tp_group)
        f32 = dict(dtype=torch.float32, device=s_hidden.device)
        g_lp = _upstream(g_log_probs, target)
        g_dv = _upstream(g_div, target) if t_hidden is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if ctx.eager is not None:
            grads = _eager_grads(ctx.eager, g_lp, g_dv, opts.tp_group)
            ctx.eager = None
            if grads is not None:
                grad_h, grad_w = grads
                return (grad_h.to(s_hidden.dtype) if need_h else None), None, \
                    (grad_w.to(weight.dtype) if need_w else None), None, None, None
        grad_h = torch.zeros(n, s_hidden.shape[1], **f32) if need_h else None
        grad_w = torch.zeros(v, weight.shape[1], **f32) if need_w else None
        c_max = min(n, opts.chunk_size)
        zs_buf = torch.empty(c_max, v, **f32)
        zt_buf = torch.empty(c_max, v, **f32) if t_hidden is not None else None
        spans = list(chunks(n, opts.chunk_size))
        live = _live_chunks(spans, g_lp, g_dv, opts.tp_group, s_hidden.device)
        for sl, (lp_live, dv_live) in zip(spans, live):
            if not (lp_live or dv_live):
                continue  # no upstream gradient on these tokens (padding): nothing to add
            c = sl.stop - sl.start
            with torch.no_grad():
                zs = _logits_chunk(s_hidden[sl], weight, n_valid, zs_buf[:c])
                # Without a divergence gradient here (e.g. gated tokens) the teacher is not needed.
                zt = _logits_chunk(t_hidden[sl], t_weight, n_valid, zt_buf[:c]) if dv_live else None
            with torch.enable_grad():
                zs.requires_grad_(True)
                lp, dv, _ = _chunk_terms(zs, zt, target[sl], opts, with_entropy=False, inplace_backward=True)
                outs, grads = [lp], [g_lp[sl]]
                if dv is not None:
                    outs.append(dv)
                    grads.append(g_dv[sl])
                (d,) = torch.autograd.grad(outs, [zs], grads)  # [c, V/tp] fp32, 0 on padded columns
            zs.requires_grad_(False)
            _add_chunk_grads(d, sl, s_hidden, weight, grad_h, grad_w)
            del d, lp, dv, outs
        del zs_buf, zt_buf
        if need_h:
            all_reduce_(grad_h, dist.ReduceOp.SUM, opts.tp_group)
            grad_h = grad_h.to(s_hidden.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, None, grad_w, None, None, None


@torch.no_grad()
def _add_chunk_grads(d, sl, s_hidden, weight, grad_h, grad_w) -> None:
    """``grad_h[sl] = d @ W`` and ``grad_w += d^T @ h[sl]`` for one chunk's logits gradient ``d`` ``[c, V/tp]``."""
    if grad_h is not None:
        if weight.dtype == torch.float32:
            torch.mm(d, weight, out=grad_h[sl])
        else:
            grad_h[sl] = torch.mm(d.to(weight.dtype), weight)
    if grad_w is not None:
        grad_w.addmm_(d.t(), s_hidden[sl].to(torch.float32))


def _eager_upstream(eager_loss, log_probs, div, sl) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss's gradient w.r.t. the chunk's log-probs and divergences, ``[c]`` each.

    ``eager_loss`` must be a sum of per-token functions of ``(log_probs[t], div[t])``, so
    the values of the tokens not computed yet (zeros here) do not change these rows.
    """
    with torch.enable_grad():
        lp = log_probs.detach().clone().requires_grad_(True)
        dv = None if div is None else div.detach().clone().requires_grad_(True)
        inputs = [lp] if dv is None else [lp, dv]
        grads = torch.autograd.grad(eager_loss(lp, dv), inputs, allow_unused=True)
    out = [torch.zeros_like(x[sl]) if g is None else g[sl].float() for x, g in zip(inputs, grads)]
    return out[0], (out[1] if dv is not None else None)


def _eager_grads(saved, g_lp, g_dv, tp_group):
    """The forward's gradients times the upstream's scale, or None when the upstream is not proportional.

    The scale is the one factor ``s`` with ``upstream = s * predicted`` (megatron's loss
    scale; 1 otherwise), checked to 1e-6 relative on every token; the decision is agreed
    over TP so that every rank takes the same path.
    """
    grad_h, grad_w, (p_lp, p_dv) = saved
    a = g_lp if g_dv is None else torch.cat([g_lp, g_dv])
    p = p_lp if p_dv is None else torch.cat([p_lp, p_dv])
    a64, p64 = a.double(), p.double()
    pp = float((p64 * p64).sum())
    scale = float((a64 * p64).sum()) / pp if pp > 0 else 0.0
    bad = (a64 - scale * p64).abs().max().item() if a.numel() else 0.0
    ok = torch.tensor([0.0 if bad <= 1e-6 * max(a64.abs().max().item() if a.numel() else 0.0, 1e-30) else 1.0])
    all_reduce_(ok, dist.ReduceOp.MAX, tp_group)
    if ok.item() > 0:  # (the warnings module shows it once per process by default)
        warnings.warn("fused_output: the upstream gradient is not the eager_loss's; recomputing the "
                      "chunks in backward (slower, exact)")
        return None
    if scale != 1.0:
        grad_h = None if grad_h is None else grad_h * scale
        grad_w = None if grad_w is None else grad_w * scale
    return grad_h, grad_w


def _live_chunks(spans: list[slice], g_lp: torch.Tensor, g_dv: torch.Tensor | None, tp_group,
                 device) -> list[tuple[bool, bool]]:
    """Per chunk: whether any token has a log-prob / divergence gradient (agreed over TP: one MAX)."""
    if not spans:
        return []
    flags = torch.zeros(len(spans), 2, dtype=torch.float32, device=device)
    for i, sl in enumerate(spans):
        flags[i, 0] = (g_lp[sl] != 0).any()
        if g_dv is not None:
            flags[i, 1] = (g_dv[sl] != 0).any()
    all_reduce_(flags, dist.ReduceOp.MAX, tp_group)
    return [(bool(a), bool(b)) for a, b in flags.tolist()]


def _chunk_terms(zs, zt, target, opts: _Options, with_entropy: bool, inplace_backward: bool = False):
    """``(log_probs, divergence or None, entropy or None)`` of one chunk of fp32 logits ``[c, V/tp]``."""
    kw = dict(tp_group=opts.tp_group, temperature=opts.temperature, chunk_size=opts.op_chunk_size)
    if zt is None:
        lp = token_log_probs(zs, target, **kw)
        ent = entropy(zs.detach(), **kw) if with_entropy else None
        return lp, None, ent
    if opts.divergence == "reverse_kl" and opts.pointwise_clip is None:
        lp, kl, ent = log_probs_kl_entropy(zs, zt, target, **kw, inplace_backward=inplace_backward,
                                           backend="torch", teacher_temperature=opts.teacher_temperature)
        return lp, kl, ent
    beta = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": opts.jsd_beta}[opts.divergence]
    lp = token_log_probs(zs, target, **kw)
    div = generalized_jsd(zs, zt, beta, pointwise_clip=opts.pointwise_clip,
                          teacher_temperature=opts.teacher_temperature, **kw)
    ent = entropy(zs.detach(), **kw) if with_entropy else None
    return lp, div, ent


def fused_output_terms(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    teacher_weight: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    jsd_beta: float = 0.5,
    pointwise_clip: float | None = None,
    chunk_size: int | None = None,
    op_chunk_size: int | None = None,
    teacher_greedy: bool = False,
    eager_loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
) -> FusedOutputTerms:
    """Log-probs, entropy and divergence to the teacher from hidden states (see module docstring).

    Args:
        student_hidden: ``[T, h]`` the student's final hidden states at the response
            positions (after the final norm), bf16 or fp32; full on every TP rank.
        teacher_hidden: ``[T, h]`` the teacher's, on the same response tokens
            (treated as a constant), or None for no teacher (no divergence).
        weight: ``[V/tp, h]`` this rank's vocabulary shard of the output layer
            (rank ``r`` holds global ids ``[r V/tp, (r+1) V/tp)``).
        target: ``[T]`` GLOBAL token ids.
        tp_group: The tensor-parallel group the vocabulary is split over; None = no TP.
        vocab_size: The unpadded vocabulary; the padded ids above it get ``-inf``.
            None = no padding.
        temperature: Softmax temperature (> 0) of the student.
        teacher_temperature: The teacher's; None = ``temperature``.
        teacher_weight: ``[V/tp, h]`` the teacher's output shard (e.g. the frozen
            initial policy's); None = ``weight`` (detached).
        divergence: ``reverse_kl`` (``KL(p_s || p_t)``), ``forward_kl`` or ``jsd``.
        jsd_beta: Mixture weight of ``jsd`` (see ``vocab_parallel_jsd``).
        pointwise_clip: Per-entry clamp of the divergence terms (OPSD); None = off.
        chunk_size: Tokens per matmul chunk; None = ``FUSED_CHUNK_TOKENS``.
        op_chunk_size: Tokens per chunk inside the vocab ops; None = their device default.
        teacher_greedy: Also return whether each target is the teacher's greedy token.
        eager_loss: ``f(log_probs [T], divergence [T] or None) -> scalar``, the loss these
            terms feed, when it is a SUM OF PER-TOKEN functions. The forward then takes its
            gradient chunk by chunk right away (4 matmuls instead of 6, no recompute);
            backward checks that the upstream gradient is that prediction times one scale
            (megatron's loss scale) and otherwise recomputes (exact either way, a warning).

    Returns:
        :class:`FusedOutputTerms`, every tensor ``[T]`` and identical on all TP ranks.
    """
    if student_hidden.dim() != 2 or weight.dim() != 2 or student_hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"student_hidden [T, h] and weight [V/tp, h] disagree: "
                         f"{tuple(student_hidden.shape)} vs {tuple(weight.shape)}")
    if teacher_hidden is not None and teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} != "
                         f"student_hidden shape {tuple(student_hidden.shape)}")
    t_weight = (weight if teacher_weight is None else teacher_weight).detach()
    if t_weight.shape != weight.shape:
        raise ValueError(f"teacher_weight shape {tuple(t_weight.shape)} != weight shape {tuple(weight.shape)}")
    if target.reshape(-1).numel() != student_hidden.shape[0]:
        raise ValueError(f"target has {target.numel()} tokens but student_hidden has {student_hidden.shape[0]}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if teacher_greedy and teacher_hidden is None:
        raise ValueError("teacher_greedy needs teacher_hidden")
    check_temperature(temperature)
    _, world = shard_rank_and_size(tp_group)
    if vocab_size is not None and not 0 < vocab_size <= weight.shape[0] * world:
        raise ValueError(f"vocab_size {vocab_size} must lie in (0, {weight.shape[0] * world}] (the padded vocabulary)")
    opts = _Options(
        tp_group=tp_group, vocab_size=vocab_size, temperature=float(temperature),
        teacher_temperature=resolve_teacher_temperature(teacher_temperature, temperature),
        divergence=divergence, jsd_beta=float(jsd_beta),
        pointwise_clip=None if pointwise_clip is None else float(pointwise_clip),
        chunk_size=resolve_fused_chunk_size(chunk_size, weight.shape[0]),
        op_chunk_size=op_chunk_size, want_greedy=teacher_greedy, eager_loss=eager_loss,
    )
    t_hidden = None if teacher_hidden is None else teacher_hidden.detach()
    lp, div, ent, greedy = _FusedOutputTerms.apply(student_hidden, t_hidden, weight, t_weight,
                                                   target.reshape(-1), opts)
    return FusedOutputTerms(
        log_probs=lp, divergence=None if teacher_hidden is None else div, entropy=ent,
        teacher_greedy=greedy if teacher_greedy else None,
    )
