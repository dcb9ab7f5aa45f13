"""Memory, time and accuracy of ``ops.fused_output`` against today's logits path.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_fused_kl.py            # V=151936, h=2048, T=4096, TP 1 and 2, CPU fp32
    PYTHONPATH=$PWD python benchmarks/bench_fused_kl.py --quick    # seconds: V=4096, h=64, T=64

Both paths go from the same seeded final hidden states to the SDPG loss's
full-vocabulary terms and back, forward and backward:

- ``logits``: the output layer as megatron runs it (student hidden states through
  an identity-forward / all-reduce-backward TP copy, times the weight shard: a
  ``[T, V/tp]`` product with autograd; the teacher's ``[T, V/tp]`` under
  ``no_grad``), then today's op ``log_probs_kl_entropy`` with
  ``inplace_backward=True`` as the trainer calls it. (Generous to it: the trainer
  also holds the logits of the prompt positions and an ``index_select`` copy.)
- ``fused``: ``fused_output_terms`` on the hidden states and the weight shard, told the
  scalar below (``eager_loss``: gradients taken during the forward, as the trainer does
  without the divergence mask);
- ``fused_recompute``: the same op not told the loss (backward recomputes every chunk).

The scalar is ``sum(w_lp * log_probs + w_kl * kl)`` with fixed random per-token
weights; both produce the student hidden states' gradient ``[T, h]`` (reduced
over TP) and the weight shard's gradient ``[V/tp, h]``.

Each (path, TP) runs in fresh spawned rank processes (``run_on_ranks``), so one
path's allocations never shadow the other's. Peak memory per rank: the kernel's
RSS high-water mark is reset (``/proc/self/clear_refs``, 5) after the inputs are
built and read (``VmHWM``) after backward; ``peak_extra_bytes`` is that minus
the RSS at the reset, the maximum over ranks. ``peak_extra_bytes_excl_grads``
subtracts the two gradients both paths must return (on a GPU they land in the
optimizer's preallocated ``main_grad`` buffers); ``mem_ratio`` is fused / logits
of that, ``mem_ratio_incl_grads`` of the raw peak. ``time_s``: wall time of
forward + backward, the slowest rank. ``time_ratio``: fused / logits; the
``_recompute`` ratios are those of ``fused_recompute``.

Accuracy vs float64 (for each path): the log-probs, KL and entropy of 16 tokens
spread over the sequence and their rows of the hidden-state gradient, from the
timed run, against a float64 dense computation over the full vocabulary; and the
weight gradient of those 16 tokens alone (the path rerun on them) against its
float64 value. ``max_rel_err`` is the largest of: ``|x - ref| / |ref|`` per
value, row-wise ``max|g - ref| / max|ref|`` for hidden-state gradients and
``max|g - ref| / max|ref|`` for the weight gradient.

Targets (issue 19): mem_ratio <= 0.1, time_ratio <= 1.2, max_rel_err <= 1e-5.
One JSON line per TP size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import torch
import torch.distributed as dist

# `python benchmarks/bench_fused_kl.py` puts benchmarks/ on the path, not the repository root it imports from.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_vocab_parallel_kl import _PeakMemory  # noqa: E402
from megatron_sdpg.ops.fused_output import fused_output_terms
from megatron_sdpg.ops.vocab_parallel_fused import log_probs_kl_entropy
from megatron_sdpg.testing.distributed import run_on_ranks

W_BLOCK = 4096  # weight rows are generated in blocks, so any shard (and the parent) can rebuild them
SAMPLE_TOKENS = 16
TEMPERATURE = 1.0


def _hidden(tokens: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher hidden states ``[T, h]``, targets ``[T]`` and the two upstream weights ``[T]``."""
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(tokens, hidden, generator=g)
    ht = hs + 0.5 * torch.randn(tokens, hidden, generator=g)
    return hs, ht, torch.randn(tokens, generator=g) / tokens, torch.rand(tokens, generator=g) / tokens, g


def _targets(tokens: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(2))


def _weight_rows(start: int, stop: int, hidden: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the ``[V, h]`` output weight (logits of std ~2)."""
    out = torch.empty(stop - start, hidden)
    for b in range(start // W_BLOCK, (stop - 1) // W_BLOCK + 1):
        g = torch.Generator().manual_seed(100 + b)
        block = torch.randn(W_BLOCK, hidden, generator=g).mul_(2.0 / hidden**0.5)
        lo, hi = max(start, b * W_BLOCK), min(stop, (b + 1) * W_BLOCK)
        out[lo - start:hi - start] = block[lo - b * W_BLOCK:hi - b * W_BLOCK]
    return out


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward: megatron's ``copy_to_tensor_model_parallel_region``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        if ctx.group is not None:
            g = g.contiguous()
            dist.all_reduce(g, group=ctx.group)
        return g, None


def _logits_path(hs, ht, w, target, w_lp, w_kl, group):
    zs = _CopyToTP.apply(hs, group) @ w.t()
    with torch.no_grad():
        zt = ht @ w.t()
    lp, kl, ent = log_probs_kl_entropy(zs, zt, target, group, TEMPERATURE, inplace_backward=True, backend="torch")
    return lp, kl, ent


def _fused_path(hs, ht, w, target, w_lp, w_kl, group, chunk_size, eager):
    eager_loss = (lambda lp, kl: (lp * w_lp).sum() + (kl * w_kl).sum()) if eager else None
    out = fused_output_terms(hs, ht, w, target, group, temperature=TEMPERATURE, chunk_size=chunk_size,
                             eager_loss=eager_loss)
    return out.log_probs, out.divergence, out.entropy


def _run_path(path, hs, ht, w_shard, target, w_lp, w_kl, group, chunk_size):
    h = hs.detach().requires_grad_(True)
    w = w_shard.detach().requires_grad_(True)
    if path == "logits":
        lp, kl, ent = _logits_path(h, ht, w, target, w_lp, w_kl, group)
    else:
        lp, kl, ent = _fused_path(h, ht, w, target, w_lp, w_kl, group, chunk_size, eager=path == "fused")
    ((lp * w_lp).sum() + (kl * w_kl).sum()).backward()
    return lp.detach(), kl.detach(), ent.detach(), h.grad, w.grad


def _rank_case(rank, world_size, path, tokens, vocab, hidden, chunk_size):
    torch.set_num_threads(1)
    group = dist.new_group(list(range(world_size))) if world_size > 1 else None
    per = vocab // world_size
    hs, ht, w_lp, w_kl, _ = _hidden(tokens, hidden)
    target = _targets(tokens, vocab)
    w_shard = _weight_rows(rank * per, (rank + 1) * per, hidden)
    rows = sorted({int(i) for i in torch.linspace(0, tokens - 1, SAMPLE_TOKENS).round().tolist()})
    meter = _PeakMemory("cpu")
    for _ in range(2):  # load code and warm allocators outside the measured region (8 tokens)
        _run_path(path, hs[:8], ht[:8], w_shard, target[:8], w_lp[:8], w_kl[:8], group, chunk_size)
    if group is not None:
        dist.barrier(group)
    meter.start()
    t0 = time.perf_counter()
    lp, kl, ent, grad_h, grad_w = _run_path(path, hs, ht, w_shard, target, w_lp, w_kl, group, chunk_size)
    elapsed = time.perf_counter() - t0
    peak = meter.peak_extra()
    grads_bytes = grad_h.numel() * grad_h.element_size() + grad_w.numel() * grad_w.element_size()
    sample = dict(lp=lp[rows], kl=kl[rows], ent=ent[rows], grad_h=grad_h[rows])
    del lp, kl, ent, grad_h, grad_w
    # The weight gradient of the sampled tokens alone (float64 can afford 16 tokens).
    idx = torch.tensor(rows)
    *_, grad_w16 = _run_path(path, hs[idx], ht[idx], w_shard, target[idx], w_lp[idx], w_kl[idx], group,
                             chunk_size)
    buf = io.BytesIO()
    torch.save(dict(rows=rows, peak=peak, grads_bytes=grads_bytes, time=elapsed, grad_w16=grad_w16, **sample), buf)
    return buf.getvalue()


def _reference(rows, tokens, vocab, hidden):
    """Float64 values and gradients of the sampled tokens over the full vocabulary."""
    hs, ht, w_lp, w_kl, _ = _hidden(tokens, hidden)
    target = _targets(tokens, vocab)[rows]
    idx = torch.tensor(rows)
    w = _weight_rows(0, vocab, hidden).double()
    h = hs[idx].double().requires_grad_(True)
    wr = w.requires_grad_(True)
    zs = (h @ wr.t()) / TEMPERATURE
    zt = (ht[idx].double() @ w.detach().t()) / TEMPERATURE
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    lp = ls.gather(1, target[:, None]).squeeze(1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    ent = -(ls.exp() * ls).sum(-1)
    ((lp * w_lp[idx].double()).sum() + (kl * w_kl[idx].double()).sum()).backward()
    return dict(lp=lp.detach(), kl=kl.detach(), ent=ent.detach(), grad_h=h.grad, grad_w=wr.grad)


def _errors(results, ref) -> dict:
    r0 = results[0]
    errs = {f"rel_err_{k}": ((r0[k].double() - ref[k]).abs() / ref[k].abs()).max().item() for k in ("lp", "kl", "ent")}
    gh = r0["grad_h"].double()
    errs["rel_err_grad_h"] = ((gh - ref["grad_h"]).abs().amax(-1) / ref["grad_h"].abs().amax(-1)).max().item()
    gw = torch.cat([r["grad_w16"] for r in results]).double()
    errs["rel_err_grad_w"] = ((gw - ref["grad_w"]).abs().max() / ref["grad_w"].abs().max()).item()
    errs["max_rel_err"] = max(errs.values())
    return errs


def run_case(path, tokens, vocab, hidden, tp, chunk_size, timeout):
    """One path on ``tp`` fresh rank processes; the per-rank results (errors come later)."""
    blobs = run_on_ranks(_rank_case, tp, path, tokens, vocab, hidden, chunk_size, timeout=timeout)
    results = [torch.load(io.BytesIO(b)) for b in blobs]
    return dict(
        time_s=max(r["time"] for r in results),
        peak_extra_bytes=max(r["peak"] for r in results),
        peak_extra_bytes_excl_grads=max(r["peak"] - r["grads_bytes"] for r in results),
    ), results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per fused chunk (default: the op's)")
    p.add_argument("--quick", action="store_true", help="V=4096, h=64, T=64: a smoke test in seconds")
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.hidden = 64, 4096, 64
    for tp in args.tp:
        if args.vocab % tp:
            raise SystemExit(f"--vocab {args.vocab} is not divisible by TP {tp}")
        common = dict(tokens=args.tokens, vocab=args.vocab, hidden=args.hidden, tp=tp, chunk_size=args.chunk_size,
                      timeout=args.timeout)
        load_before = os.getloadavg()[0]
        logits, logits_results = run_case("logits", **common)
        fused, fused_results = run_case("fused", **common)
        recompute, recompute_results = run_case("fused_recompute", **common)
        # The float64 reference only now: no rank process runs while it holds its [V, h] float64 tensors.
        ref = _reference(logits_results[0]["rows"], args.tokens, args.vocab, args.hidden)
        for summary, results in ((logits, logits_results), (fused, fused_results),
                                 (recompute, recompute_results)):
            summary.update(_errors(results, ref))
        del ref, logits_results, fused_results, recompute_results
        line = dict(case=f"tp{tp}_T{args.tokens}", tp=tp, tokens=args.tokens, vocab=args.vocab, hidden=args.hidden,
                    dtype="fp32", device="cpu", chunk_size=args.chunk_size,
                    load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                    logits=logits, fused=fused, fused_recompute=recompute,
                    mem_ratio=fused["peak_extra_bytes_excl_grads"] / logits["peak_extra_bytes_excl_grads"],
                    mem_ratio_incl_grads=fused["peak_extra_bytes"] / logits["peak_extra_bytes"],
                    time_ratio=fused["time_s"] / logits["time_s"],
                    max_rel_err=fused["max_rel_err"],
                    mem_ratio_recompute=(recompute["peak_extra_bytes_excl_grads"]
                                         / logits["peak_extra_bytes_excl_grads"]),
                    time_ratio_recompute=recompute["time_s"] / logits["time_s"],
                    max_rel_err_recompute=recompute["max_rel_err"])
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
