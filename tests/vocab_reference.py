"""Float64 dense references for the vocab-parallel ops, and a shard-side driver.

The references work on the full (gathered) vocabulary in float64, written
directly from the definitions. Gradients come from autograd of these formulas
when no logit is masked, and from the analytic formulas otherwise (autograd of
``where(p > 0, p * log p, 0)`` is NaN at masked entries); the unit tests check
that the analytic formulas equal autograd on unmasked data.

``run_ops_on_shard`` is what every rank runs: it slices its vocabulary shard
out of the full logits, calls the project's ops, and returns the per-token
values and its gradient shards for the parent to reassemble.
"""

from __future__ import annotations

import math

import torch

JSD_BETAS = (0.0, 0.5, 1.0)
JSD_CLIP = 0.02


def make_cases(vocab: int = 64) -> list[dict]:
    """Seeded cases covering leading dims, temperature, chunking, masks, bf16, T=0."""
    g = torch.Generator().manual_seed(1234)

    def logits(shape, scale=3.0):
        return torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale

    cases = []
    # [s, b, v]: 15 tokens, chunk 4; padding tokens get upstream weight 0.
    shape = (5, 3)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w[0, 1] = w[4, 2] = 0.0
    cases.append(dict(name="sbv_fp32", student=logits(shape), teacher=logits(shape),
                      target=torch.randint(0, vocab, shape, generator=g), weight=w,
                      temperature=1.0, chunk=4, dtype=torch.float32, masked=False, clip=JSD_CLIP))
    # [t, v], temperature 0.7, chunk 5 over 13 tokens, -inf at the same entries in both.
    n = 13
    s, t = logits((n,)), logits((n,))
    mask = torch.rand(n, vocab, generator=g) < 0.25
    mask[:, 0] = False  # every row keeps a finite entry
    target = torch.randint(0, vocab, (n,), generator=g)
    mask[torch.arange(n), target] = False
    s[mask] = -math.inf
    t[mask] = -math.inf
    w = torch.randn(n, generator=g, dtype=torch.float64)
    w[3] = 0.0
    cases.append(dict(name="masked_fp32", student=s, teacher=t, target=target, weight=w,
                      temperature=0.7, chunk=5, dtype=torch.float32, masked=True, clip=None))
    # bf16 inputs: the reference uses the same bf16-rounded values in float64.
    n = 11
    s = logits((n,)).to(torch.bfloat16).double()
    t = logits((n,)).to(torch.bfloat16).double()
    cases.append(dict(name="bf16", student=s, teacher=t, target=torch.randint(0, vocab, (n,), generator=g),
                      weight=torch.randn(n, generator=g, dtype=torch.float64), temperature=1.0, chunk=3,
                      dtype=torch.bfloat16, masked=False, clip=None))
    # The authors' teacher scaling: only the student is divided by T (the teacher at T_t = 1).
    for dtype in (torch.float32, torch.bfloat16):
        n = 9
        s = logits((n,)).to(dtype).double()
        t = (s + logits((n,), scale=1.5)).to(dtype).double()
        cases.append(dict(name=f"student_only_{str(dtype).removeprefix('torch.')}", student=s, teacher=t,
                          target=torch.randint(0, vocab, (n,), generator=g),
                          weight=torch.randn(n, generator=g, dtype=torch.float64), temperature=0.7,
                          teacher_temperature=1.0, chunk=4, dtype=dtype, masked=False,
                          clip=JSD_CLIP if dtype == torch.float32 else None))
    # Empty response: no tokens at all.
    cases.append(dict(name="empty", student=logits((0,)), teacher=logits((0,)),
                      target=torch.zeros(0, dtype=torch.long), weight=torch.zeros(0, dtype=torch.float64),
                      temperature=1.0, chunk=4, dtype=torch.float32, masked=False, clip=None))
    return cases


GRID_TEMPERATURES = (0.6, 0.7, 1.0, 1.3)
GRID_DTYPES = (torch.float32, torch.bfloat16)


def temperature_grid(vocab: int = 64, tokens: int = 6) -> list[dict]:
    """The temperature x dtype grid: T in ``GRID_TEMPERATURES``, fp32 and bf16.

    Each case has ``tokens`` rows of logits with scale 4 (so ``z / T`` needs more
    mantissa than bf16 has) and one sharply peaked row (a logit of 30 over the
    rest): with the division done in bf16 its log-probability came out positive.
    The reference uses the same dtype-rounded values in float64.
    """
    cases = []
    for dtype in GRID_DTYPES:
        for temperature in GRID_TEMPERATURES:
            g = torch.Generator().manual_seed(int(temperature * 10) + (100 if dtype == torch.bfloat16 else 0))
            s = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 4
            t = s + torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 2
            target = torch.randint(0, vocab, (tokens,), generator=g)
            s[0, target[0]] = 30.0  # the peaked row: nearly all mass on the target
            s, t = s.to(dtype).double(), t.to(dtype).double()
            w = torch.randn(tokens, generator=g, dtype=torch.float64)
            cases.append(dict(name=f"T{temperature}_{str(dtype).removeprefix('torch.')}", student=s, teacher=t,
                              target=target, weight=w, temperature=temperature, chunk=4, dtype=dtype,
                              masked=False, clip=None))
    return cases


def run_ops_on_shard(case: dict, rank: int, world_size: int, tp_group) -> dict:
    """Runs every op on this rank's vocabulary shard; returns values and grad shards."""
    from megatron_sdpg.ops.vocab_parallel import entropy, full_vocab_kl, generalized_jsd, token_log_probs

    vocab = case["student"].shape[-1]
    per = vocab // world_size
    sl = slice(rank * per, (rank + 1) * per)
    s = case["student"][..., sl].to(case["dtype"]).contiguous()
    t = case["teacher"][..., sl].to(case["dtype"]).contiguous()
    w = case["weight"].float()
    kw = dict(tp_group=tp_group, temperature=case["temperature"], chunk_size=case["chunk"])
    tkw = dict(kw, teacher_temperature=case.get("teacher_temperature"))  # ops with a teacher

    ops = {
        "log_prob": lambda x: token_log_probs(x, case["target"], **kw),
        "entropy": lambda x: entropy(x, **kw),
        "kl": lambda x: full_vocab_kl(x, t, **tkw),
    }
    for beta in JSD_BETAS:
        ops[f"jsd{beta}"] = lambda x, beta=beta: generalized_jsd(x, t, beta, **tkw)
        if case["clip"] is not None:
            ops[f"jsd{beta}_clip"] = lambda x, beta=beta: generalized_jsd(
                x, t, beta, pointwise_clip=case["clip"], **tkw)
    out = {}
    for name, op in ops.items():
        x = s.clone().requires_grad_(True)
        value = op(x)
        (grad,) = torch.autograd.grad(value, x, w, allow_unused=False) if value.numel() else (torch.zeros_like(x),)
        out[name] = (value.detach(), grad.detach())
    out.update(_run_fused(s, t, w, case["target"], tkw))
    return out


def run_kl_ops_on_shard(case: dict, rank: int, world_size: int, tp_group, backend: str) -> dict:
    """The ops that have a Triton path (``full_vocab_kl``, the fused op) with ``backend``."""
    from megatron_sdpg.ops.vocab_parallel import full_vocab_kl

    per = case["student"].shape[-1] // world_size
    sl = slice(rank * per, (rank + 1) * per)
    s = case["student"][..., sl].to(case["dtype"]).contiguous()
    t = case["teacher"][..., sl].to(case["dtype"]).contiguous()
    w = case["weight"].float()
    kw = dict(tp_group=tp_group, temperature=case["temperature"], chunk_size=case["chunk"], backend=backend,
              teacher_temperature=case.get("teacher_temperature"))
    x = s.clone().requires_grad_(True)
    kl = full_vocab_kl(x, t, **kw)
    (grad,) = torch.autograd.grad(kl, x, w) if kl.numel() else (torch.zeros_like(x),)
    out = {"kl": (kl.detach(), grad.detach())}
    out.update(_run_fused(s, t, w, case["target"], kw))
    return out


def _run_fused(s, t, w, target, kw) -> dict:
    """The fused op: each output's gradient alone, and of ``sum(w * log_prob + 0.5 * w * kl)``."""
    from megatron_sdpg.ops.vocab_parallel_fused import log_probs_kl_entropy

    x = s.clone().requires_grad_(True)
    lp, kl, ent = log_probs_kl_entropy(x, t, target, **kw)
    if lp.numel():
        (g_lp,) = torch.autograd.grad(lp, x, w, retain_graph=True)
        (g_kl,) = torch.autograd.grad(kl, x, w, retain_graph=True)
        (g_both,) = torch.autograd.grad([lp, kl], x, [w, 0.5 * w])
    else:
        g_lp = g_kl = g_both = torch.zeros_like(x)
    zeros = torch.zeros_like(x)
    return {"fused_log_prob": (lp.detach(), g_lp), "fused_kl": (kl.detach(), g_kl),
            "fused_entropy": (ent, zeros), "fused_both": (kl.detach(), g_both)}


# ---------------------------------------------------------------- references


def _log_softmax(z, temperature):
    return (z / temperature).log_softmax(dim=-1)


def _plogr(p, log_ratio):
    """sum p * log_ratio with 0 where p == 0."""
    return torch.where(p > 0, p * log_ratio, torch.zeros_like(p)).sum(dim=-1)


def ref_value(name: str, s, t, target, temperature, clip=None, t_temperature=None):
    """Float64 dense value of op ``name`` (full vocabulary); the teacher at ``t_temperature`` (None: T)."""
    ls, lt = _log_softmax(s, temperature), _log_softmax(t, t_temperature or temperature)
    ps, pt = ls.exp(), lt.exp()
    if name == "log_prob":
        return ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if name == "entropy":
        return -_plogr(ps, ls)
    if name == "kl":
        return _plogr(ps, ls - lt)
    beta = float(name[3:].split("_")[0])
    if beta == 0.0:
        e = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt))
    elif beta == 1.0:
        e = torch.where(ps > 0, ps * (ls - lt), torch.zeros_like(ps))
    else:
        lm = torch.log(beta * pt + (1 - beta) * ps)
        e = beta * torch.where(pt > 0, pt * (lt - lm), torch.zeros_like(pt)) + (1 - beta) * torch.where(
            ps > 0, ps * (ls - lm), torch.zeros_like(ps))
    if name.endswith("_clip"):
        e = e.clamp(max=clip)
    return e.sum(dim=-1)


def ref_grad_autograd(name, s, t, target, weight, temperature, clip=None, t_temperature=None):
    """Gradient w.r.t. ``s`` of ``sum(weight * value)``, by float64 autograd."""
    x = s.clone().requires_grad_(True)
    (ref_value(name, x, t, target, temperature, clip, t_temperature) * weight).sum().backward()
    return x.grad


def ref_grad_analytic(name, s, t, target, weight, temperature):
    """The closed-form gradients (no clipping), valid at masked entries too."""
    ls, lt = _log_softmax(s, temperature), _log_softmax(t, temperature)
    ps, pt = ls.exp(), lt.exp()
    w = (weight / temperature).unsqueeze(-1)

    def p_times(d):
        return torch.where(ps > 0, ps * d, torch.zeros_like(ps))

    if name == "log_prob":
        onehot = torch.nn.functional.one_hot(target, s.shape[-1]).to(s.dtype)
        return (onehot - ps) * w
    if name == "entropy":
        h = ref_value("entropy", s, t, target, temperature).unsqueeze(-1)
        return -p_times(ls + h) * w
    if name in ("kl", "jsd1.0"):
        kl = ref_value("kl", s, t, target, temperature).unsqueeze(-1)
        return p_times(ls - lt - kl) * w
    if name == "jsd0.0":
        return (ps - pt) * w
    beta = float(name[3:])
    lm = torch.log(beta * pt + (1 - beta) * ps)
    kl_sm = _plogr(ps, ls - lm).unsqueeze(-1)
    return (1 - beta) * p_times(ls - lm - kl_sm) * w


# Stated tolerances: |x - ref| <= ATOL * scale + RTOL * |ref| elementwise, with
# scale = max|ref| (so tiny gradient entries are judged against the largest one).
# fp32 inputs: fp32 accumulation error only. bf16 inputs: values are fp32 from
# bf16-exact inputs (same as fp32); gradients are rounded to bf16 (8-bit mantissa).
TOLERANCES = {
    torch.float32: dict(value=(1e-5, 1e-5), grad=(1e-5, 1e-5)),
    torch.bfloat16: dict(value=(1e-5, 1e-5), grad=(4e-3, 8e-3)),
}


def _assert_close(x, ref, atol_rel, rtol, what):
    x = x.double()
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    both_inf = torch.isinf(ref) & (x == ref)
    finite_ref = ref[~both_inf]
    scale = finite_ref.abs().max().item() if finite_ref.numel() else 0.0
    err = torch.where(both_inf, torch.zeros_like(x), (x - ref).abs())
    bound = atol_rel * max(scale, 1e-12) + rtol * ref.abs()
    bad = ~(err <= torch.where(both_inf, torch.ones_like(bound), bound))
    assert not bad.any(), (
        f"{what}: max error {err[bad].max().item():.3e} over tolerance (scale {scale:.3e}) "
        f"at {bad.nonzero()[0].tolist()}"
    )


def check_against_reference(case: dict, shard_results: list[dict]) -> None:
    """Reassembles the per-rank outputs of one case and compares with float64 dense."""
    tol = TOLERANCES[case["dtype"]]
    s, t, target, w, temp = case["student"], case["teacher"], case["target"], case["weight"], case["temperature"]
    t_temp = case.get("teacher_temperature")
    for name in shard_results[0]:
        values = [r[name][0] for r in shard_results]
        for rank, v in enumerate(values[1:], start=1):
            assert torch.equal(v, values[0]), f"{case['name']}/{name}: rank {rank} value differs from rank 0"
        grad = torch.cat([r[name][1] for r in shard_results], dim=-1)
        clip = case["clip"] if name.endswith("_clip") else None
        base = name.removeprefix("fused_")
        assert not (case["masked"] and t_temp is not None), "masked cases use one temperature"
        grad_fn = ref_grad_analytic if case["masked"] else ref_grad_autograd
        extra = () if case["masked"] else (clip, t_temp)
        if base == "both":  # value: the KL; gradient of w * log_prob + 0.5 * w * kl
            ref_v = ref_value("kl", s, t, target, temp, None, t_temp)
            ref_g = grad_fn("log_prob", s, t, target, w, temp, *extra) + grad_fn("kl", s, t, target, 0.5 * w, temp, *extra)
        else:
            ref_v = ref_value(base, s, t, target, temp, clip, t_temp)
            ref_g = None if name == "fused_entropy" else grad_fn(base, s, t, target, w, temp, *extra)
        what = f"{case['name']}/{name}"
        _assert_close(values[0], ref_v, *tol["value"], what + " value")
        if ref_g is not None:
            _assert_close(grad, ref_g, *tol["grad"], what + " grad")
        assert grad.dtype == case["dtype"], f"{what}: grad dtype {grad.dtype}"
