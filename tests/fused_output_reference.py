"""Float64 dense reference for ``ops.fused_output`` and the per-rank driver of its tests.

The reference multiplies the hidden states by the UNPADDED output weight in
float64 (padded ids do not exist in it), takes the definitions of
``vocab_reference.ref_value`` and differentiates ``sum(w_lp * log_probs +
w_div * divergence)`` by float64 autograd w.r.t. the hidden states and the
weight. The driver slices a rank's padded vocabulary shard, runs the op and
returns its values and gradients for the parent to compare.
"""

from __future__ import annotations

import torch

from tests.vocab_reference import ref_value

VOCAB, PADDED, HIDDEN, TOKENS = 50, 56, 16, 13


def make_case(name: str, temperature: float, dtype: torch.dtype, divergence: str = "reverse_kl",
              teacher_scaling: bool = True, seed: int = 7) -> dict:
    """One seeded case; inputs are rounded to ``dtype`` and kept as float64 for the reference."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    ht = hs + 0.5 * torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64)
    w = torch.randn(PADDED, HIDDEN, generator=g, dtype=torch.float64) * 0.6
    w_teacher = w + 0.2 * torch.randn(PADDED, HIDDEN, generator=g, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    w_lp = torch.randn(TOKENS, generator=g, dtype=torch.float64)
    w_div = torch.randn(TOKENS, generator=g, dtype=torch.float64)
    w_lp[2] = w_div[2] = 0.0  # a padding token
    rnd = lambda x: x.to(dtype).double()  # noqa: E731
    return dict(name=name, hs=rnd(hs), ht=rnd(ht), w=rnd(w), w_teacher=rnd(w_teacher), target=target,
                w_lp=w_lp, w_div=w_div, temperature=temperature, dtype=dtype, divergence=divergence,
                t_temperature=temperature if teacher_scaling else 1.0)


def _ref_name(divergence: str) -> str:
    return {"reverse_kl": "kl", "forward_kl": "jsd0.0", "jsd": "jsd0.5"}[divergence]


def reference(case: dict, own_teacher_weight: bool = False) -> dict:
    """Float64 values ``[T]`` and gradients (hidden ``[T, h]``, weight ``[PADDED, h]``)."""
    hs = case["hs"].clone().requires_grad_(True)
    w = case["w"].clone().requires_grad_(True)
    wt = case["w_teacher"] if own_teacher_weight else w.detach()
    zs = hs @ w[:VOCAB].t()
    zt = case["ht"] @ wt[:VOCAB].t()
    T, Tt = case["temperature"], case["t_temperature"]
    lp = ref_value("log_prob", zs, zt, case["target"], T)
    div = ref_value(_ref_name(case["divergence"]), zs, zt, case["target"], T, t_temperature=Tt)
    ent = ref_value("entropy", zs, zt, case["target"], T)
    greedy = zt.gather(1, case["target"][:, None]).squeeze(1) >= zt.amax(-1)
    (lp * case["w_lp"] + div * case["w_div"]).sum().backward()
    return dict(log_probs=lp.detach(), divergence=div.detach(), entropy=ent.detach(), greedy=greedy,
                grad_h=hs.grad, grad_w=w.grad)


def run_on_shard(case: dict, rank: int, world: int, tp_group, own_teacher_weight: bool = False,
                 chunk_size: int = 5, eager: str | None = None) -> dict:
    """This rank's op results: values, ``grad_h`` ``[T, h]`` and its weight shard's gradient.

    ``eager``: None (recompute in backward); ``"exact"`` (the op is told the loss);
    ``"scaled"`` (the actual loss is 3x the one it is told: the scale path);
    ``"wrong"`` (it is told other weights: the fallback).
    """
    from megatron_sdpg.ops.fused_output import fused_output_terms

    per = PADDED // world
    dt = case["dtype"]
    hs = case["hs"].to(dt).requires_grad_(True)
    w = case["w"][rank * per:(rank + 1) * per].to(dt).requires_grad_(True)
    wt = case["w_teacher"][rank * per:(rank + 1) * per].to(dt) if own_teacher_weight else None
    w_lp, w_div = case["w_lp"].float(), case["w_div"].float()
    told = {None: None, "exact": (w_lp, w_div), "scaled": (w_lp / 3, w_div / 3),
            "wrong": (w_div, w_lp)}[eager]
    eager_loss = None if told is None else (lambda lp, dv: (lp * told[0]).sum() + (dv * told[1]).sum())
    out = fused_output_terms(
        hs, case["ht"].to(dt), w, case["target"], tp_group, vocab_size=VOCAB,
        temperature=case["temperature"], teacher_temperature=case["t_temperature"], teacher_weight=wt,
        divergence=case["divergence"], chunk_size=chunk_size, op_chunk_size=3, teacher_greedy=True,
        eager_loss=eager_loss,
    )
    loss = (out.log_probs * w_lp).sum() + (out.divergence * w_div).sum()
    loss.backward()
    return dict(log_probs=out.log_probs.detach().double(), divergence=out.divergence.detach().double(),
                entropy=out.entropy.double(), greedy=out.teacher_greedy, grad_h=hs.grad.double(),
                grad_w=w.grad.double())


def tolerance(dtype: torch.dtype) -> float:
    """Error allowed relative to each quantity's largest magnitude.

    fp32: the op's arithmetic. bf16: the logits are a bf16 product (as the output
    layer's), i.e. rounded by 2^-8 relative, which moves log-probs by ~1e-2.
    """
    return 2e-5 if dtype == torch.float32 else 4e-2


def assert_matches(got: dict, ref: dict, dtype: torch.dtype, what: str, grad_w_rows: slice | None = None) -> None:
    """Values and both gradients within ``tolerance(dtype)`` of the scale of each reference."""
    tol = tolerance(dtype)
    for key in ("log_probs", "divergence", "entropy", "grad_h", "grad_w"):
        r = ref[key]
        if key == "grad_w" and grad_w_rows is not None:
            r = r[grad_w_rows]
        scale = max(ref[key].abs().max().item(), 1e-3)
        err = (got[key] - r).abs().max().item()
        assert err <= tol * scale, f"{what}: {key} off by {err:.3g} (scale {scale:.3g}, tol {tol:g})"
    if dtype == torch.float32:
        assert torch.equal(got["greedy"], ref["greedy"]), what
