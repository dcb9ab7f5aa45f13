"""``ops.fused_output`` without TP against the float64 dense reference (values and both gradients)."""

import pytest
import torch

from megatron_sdpg.ops.fused_output import fused_output_terms
from tests import fused_output_reference as R
from tests.vocab_reference import ref_value

CASES = [
    R.make_case(f"{div}_T{t}_{str(dt)[6:]}", t, dt, div)
    for dt in (torch.float32, torch.bfloat16)
    for t in (0.7, 1.0)
    for div in ("reverse_kl", "jsd")
] + [R.make_case("forward_kl_T0.7_fp32", 0.7, torch.float32, "forward_kl"),
     R.make_case("student_only_T0.7_bf16", 0.7, torch.bfloat16, teacher_scaling=False)]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fused_output_matches_float64_dense(case):
    """Padded vocabulary (50 of 56), chunks of 5 over 13 tokens, a zero-weight token."""
    got = R.run_on_shard(case, 0, 1, None)
    R.assert_matches(got, R.reference(case), case["dtype"], case["name"])
    assert got["grad_w"][R.VOCAB:].abs().max().item() == 0.0  # padded ids get no gradient


def test_own_teacher_weight_is_a_constant():
    case = R.make_case("own", 0.7, torch.float32)
    R.assert_matches(R.run_on_shard(case, 0, 1, None, own_teacher_weight=True),
                     R.reference(case, own_teacher_weight=True), torch.float32, "own teacher weight")


def test_chunk_size_does_not_change_results():
    case = R.make_case("chunks", 1.0, torch.float32)
    a = R.run_on_shard(case, 0, 1, None, chunk_size=1)
    b = R.run_on_shard(case, 0, 1, None, chunk_size=64)
    for key in ("log_probs", "divergence", "grad_h", "grad_w"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)  # fp32 summation order


def test_tied_embeddings_accumulate_both_uses_of_the_weight():
    """The same weight embeds the inputs and scores the vocabulary: its gradient is the sum."""
    case = R.make_case("tied", 0.7, torch.float32)
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(0, R.VOCAB, (R.TOKENS,), generator=g)
    mix = torch.randn(R.HIDDEN, R.HIDDEN, generator=g, dtype=torch.float64) * 0.3

    def hidden(w):
        return torch.tanh(w[inputs] @ mix)

    w64 = case["w"].clone().requires_grad_(True)
    h64 = hidden(w64)
    zs, zt = h64 @ w64[:R.VOCAB].t(), hidden(w64).detach() @ w64.detach()[:R.VOCAB].t()
    lp = ref_value("log_prob", zs, zt, case["target"], 0.7)
    kl = ref_value("kl", zs, zt, case["target"], 0.7)
    (lp * case["w_lp"] + kl * case["w_div"]).sum().backward()

    w = case["w"].float().requires_grad_(True)
    h = hidden(w.double()).float()  # the same graph in fp32 up to the hidden states
    out = fused_output_terms(h, h.detach(), w, case["target"], vocab_size=R.VOCAB, temperature=0.7, chunk_size=4)
    ((out.log_probs * case["w_lp"].float()).sum() + (out.divergence * case["w_div"].float()).sum()).backward()
    scale = w64.grad.abs().max().item()
    assert (w.grad.double() - w64.grad).abs().max().item() <= 2e-5 * scale


def test_no_teacher_gives_log_probs_and_entropy_only():
    case = R.make_case("solo", 0.7, torch.float32)
    hs = case["hs"].float().requires_grad_(True)
    w = case["w"].float().requires_grad_(True)
    out = fused_output_terms(hs, None, w, case["target"], vocab_size=R.VOCAB, temperature=0.7, chunk_size=4)
    assert out.divergence is None and out.teacher_greedy is None
    (out.log_probs * case["w_lp"].float()).sum().backward()
    ref = R.reference(dict(case, w_div=torch.zeros(R.TOKENS, dtype=torch.float64)))
    for got, want in ((out.log_probs, ref["log_probs"]), (out.entropy, ref["entropy"]),
                      (hs.grad, ref["grad_h"]), (w.grad, ref["grad_w"])):
        assert (got.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()


def test_zero_tokens():
    w = torch.randn(8, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    out = fused_output_terms(h, h.detach(), w, torch.zeros(0, dtype=torch.long))
    assert out.log_probs.shape == (0,)
    (out.log_probs.sum() + out.divergence.sum()).backward()
    assert w.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(divergence="tvd"), "divergence"),
    (dict(vocab_size=99), "vocab_size"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    w = torch.randn(8, 4)
    h = torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        fused_output_terms(h, h, w, torch.zeros(3, dtype=torch.long), **kwargs)


def test_chunks_without_upstream_gradient_skip_work_and_stay_exact():
    """Chunk 1 (tokens 0-4) has no divergence gradient, chunk 2 (5-9) none at all."""
    case = R.make_case("gated", 0.7, torch.float32)
    case["w_div"][:10] = 0.0
    case["w_lp"][5:10] = 0.0
    got = R.run_on_shard(case, 0, 1, None, chunk_size=5)
    R.assert_matches(got, R.reference(case), torch.float32, "gated chunks")
    assert got["grad_h"][5:10].abs().max().item() == 0.0


@pytest.mark.parametrize("eager", ["exact", "scaled", "wrong"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_gradients_match_float64_dense(eager, dtype, monkeypatch):
    """Gradients taken in the forward (told the loss), rescaled (told 1/3 of it) or recomputed (told a wrong one)."""
    import warnings

    from megatron_sdpg.ops import fused_output as fo

    products = []
    original = fo._logits_chunk
    monkeypatch.setattr(fo, "_logits_chunk", lambda *a: products.append(1) or original(*a))
    case = R.make_case(f"eager_{eager}", 0.7, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = R.run_on_shard(case, 0, 1, None, eager=eager)
    R.assert_matches(got, R.reference(case), dtype, case["name"])
    fell_back = any("recomputing" in str(w.message) for w in caught)
    assert fell_back == (eager == "wrong")
    # 13 tokens in chunks of 5: 3 chunks x 2 views forward, and again in backward only on the fallback.
    assert len(products) == (12 if eager == "wrong" else 6)
