"""The Triton path of ``full_vocab_kl`` / ``log_probs_kl_entropy`` on CPU, in Triton's interpreter.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which must be set
before ``triton`` itself is imported (its standard library is decorated at
import too): every kernel run happens in fresh spawned ranks
(``run_on_ranks(..., env=...)``), and this module imports neither triton nor
``vocab_parallel_triton`` at top level. The ranks select the kernels through the public functions
(``backend="triton"``) with a 32-entry block, so a 100-entry vocabulary spans
4 blocks (the last one partial) and a TP=2 shard of 50 spans 2. Rows are one
program each, so any token count is covered by the 15-, 13- and 11-token cases.

Checked against the float64 dense reference (values and gradients, tolerances
in tests/vocab_reference.py) for fp32, bf16, temperature 0.7 with masked
(-inf) logits and no tokens at all, on 1 and 2 gloo ranks; the TP=2 result is
also compared with the single-process one. (The interpreter rounds fp32 to
bf16 by truncation where GPUs round to nearest: bf16 gradients here can be one
bf16 step further from float64 than on a GPU, within the bf16 tolerance.) A separate test compiles the
kernels for sm_90 (Hopper) without a GPU, which catches typing errors the
interpreter lets through. GPU speed is measured by
``benchmarks/bench_vocab_parallel_kl.py`` (``project_triton``), not here.
"""

import importlib.util
import io
import math
import os
import warnings

import pytest
import torch

from megatron_sdpg.ops.vocab_shard import BACKEND_ENV, use_triton
from megatron_sdpg.testing.distributed import run_on_ranks
from tests import vocab_reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

VOCAB = 100
BLOCK = 32
INTERPRET = {"TRITON_INTERPRET": "1"}


def _interpreted_kernels():
    """Imports the kernels in interpreter mode (in a spawned rank) with the small block."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy on -inf - -inf, which is masked
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from megatron_sdpg.ops import vocab_parallel_triton as vpt

    for fn in (tl.standard.sum, vpt._row_stats_kernel):
        assert isinstance(fn, InterpretedFunction), "triton was imported before TRITON_INTERPRET was set"
    vpt.BLOCK_V = BLOCK
    return vpt


def _on_ranks(rank, world_size):
    """Every case on this rank's shard; rank 0 also runs them without TP (the whole vocabulary)."""
    import torch.distributed as dist

    _interpreted_kernels()
    group = dist.new_group(list(range(world_size)))
    cases = ref.make_cases(VOCAB)
    results = [ref.run_kl_ops_on_shard(c, rank, world_size, group, "triton") for c in cases]
    single = [ref.run_kl_ops_on_shard(c, 0, 1, None, "triton") for c in cases] if rank == 0 else None
    buf = io.BytesIO()
    torch.save((results, single), buf)
    return buf.getvalue()


def test_triton_kernels_match_float64_dense_and_single_process_on_2_ranks():
    per_rank = [torch.load(io.BytesIO(b)) for b in run_on_ranks(_on_ranks, 2, timeout=240, env=INTERPRET)]
    single = per_rank[0][1]
    for i, case in enumerate(ref.make_cases(VOCAB)):
        ref.check_against_reference(case, [single[i]])
        ref.check_against_reference(case, [r[0][i] for r in per_rank])
        for name, (value, grad) in single[i].items():
            what = f"{case['name']}/{name}"
            torch.testing.assert_close(per_rank[0][0][i][name][0], value, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{what} value, TP=2 vs 1: {m}")
            got_grad = torch.cat([r[0][i][name][1] for r in per_rank], dim=-1)
            scale = grad.abs().max().item() if grad.numel() else 0.0
            # fp32: accumulation order only; bf16: the fp32 gradients round at most one step apart.
            tol = dict(rtol=8e-3, atol=0.0) if grad.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6 * scale)
            torch.testing.assert_close(got_grad, grad, **tol, msg=lambda m: f"{what} grad, TP=2 vs 1: {m}")


GRID_VOCAB = 64
GRID_BLOCK = 16


def _grid_on_ranks(rank, world_size):
    """The temperature grid through the kernels at TP 4 (every rank), TP 2 (ranks 0-1) and TP 1 (rank 0)."""
    import torch.distributed as dist

    vpt = _interpreted_kernels()
    vpt.BLOCK_V = GRID_BLOCK  # a 16-entry shard at TP 4 is one block; 64 entries at TP 1 are four
    cases = ref.temperature_grid(GRID_VOCAB, tokens=3)
    tp4 = dist.new_group(list(range(world_size)))
    tp2 = dist.new_group([0, 1])  # every rank must take part in creating it
    out = {4: [ref.run_kl_ops_on_shard(c, rank, world_size, tp4, "triton") for c in cases]}
    if rank < 2:
        out[2] = [ref.run_kl_ops_on_shard(c, rank, 2, tp2, "triton") for c in cases]
    if rank == 0:
        out[1] = [ref.run_kl_ops_on_shard(c, 0, 1, None, "triton") for c in cases]
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def test_triton_kernels_match_float64_over_the_temperature_grid_at_tp_1_2_4():
    """T in {0.6, 0.7, 1.0, 1.3}, fp32 and bf16: KL and fused op, values and gradients vs float64."""
    per_rank = [torch.load(io.BytesIO(b)) for b in run_on_ranks(_grid_on_ranks, 4, timeout=300, env=INTERPRET)]
    for i, case in enumerate(ref.temperature_grid(GRID_VOCAB, tokens=3)):
        for tp in (1, 2, 4):
            ref.check_against_reference(dict(case, name=f"{case['name']}/tp{tp}"),
                                        [r[tp][i] for r in per_rank[:tp]])


def _edge_cases(rank, world_size):
    """Infinite KL, in-place backward, non-contiguous rows; returns tensors to check."""
    vpt = _interpreted_kernels()
    s = torch.zeros(2, 40)
    t = torch.zeros(2, 40)
    t[0, 35] = -math.inf  # teacher masks an entry the student gives mass, in the second block
    x = s.clone().requires_grad_(True)
    kl = vpt.triton_full_vocab_kl(x, t)
    kl.backward(torch.tensor([0.0, 1.0]))
    inf_case = (kl.detach(), x.grad)

    g = torch.Generator().manual_seed(5)
    big = torch.randn(9, 2 * 70, generator=g) * 3
    s, t = big[:, ::2], torch.randn(9, 70, generator=g) * 3  # student rows with stride 2 (not unit)
    w = torch.randn(9, generator=g)
    x = s.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(vpt.triton_full_vocab_kl(x, t, temperature=1.3), x, w)
    (g_strided,) = torch.autograd.grad(vpt.triton_full_vocab_kl(s.requires_grad_(True), t, temperature=1.3), s, w)
    leaf = s.detach().contiguous().requires_grad_(True)
    (g_inplace,) = torch.autograd.grad(
        vpt.triton_full_vocab_kl(leaf * 1.0, t, temperature=1.3, inplace_backward=True), leaf, w)
    leaf = s.detach().contiguous().requires_grad_(True)
    target = torch.randint(0, 70, (9,), generator=g)
    lp, kl2, _ = vpt.triton_log_probs_kl_entropy(leaf * 1.0, t, target, temperature=1.3, inplace_backward=True)
    (g_fused_inplace,) = torch.autograd.grad([lp, kl2], leaf, [w, w])
    x = s.detach().clone().requires_grad_(True)
    lp, kl2, _ = vpt.triton_log_probs_kl_entropy(x, t, target, temperature=1.3)
    (g_fused,) = torch.autograd.grad([lp, kl2], x, [w, w])
    y = s.detach().contiguous().requires_grad_(True) * 1.0
    saved_by_another_node = (y ** 2).sum()  # pow saves y; the in-place backward below overwrites it
    kl3 = vpt.triton_full_vocab_kl(y, t, inplace_backward=True)
    try:
        (kl3.sum() + saved_by_another_node).backward()
        version_error = None
    except RuntimeError as e:
        version_error = str(e)
    return inf_case, (g_ref, g_strided, g_inplace), (g_fused, g_fused_inplace), (s.detach(), t, w), version_error


def test_infinite_kl_inplace_backward_and_strided_rows():
    """Also: an in-place backward that overwrites logits another node saved fails loudly."""
    inf_case, kl_grads, fused_grads, (s, t, w), version_error = run_on_ranks(
        _edge_cases, 1, timeout=120, env=INTERPRET)[0]
    assert version_error is not None and "modified by an inplace operation" in version_error
    kl, grad = inf_case
    assert kl[0].item() == math.inf and kl[1].item() == 0.0
    assert torch.isfinite(grad).all() and grad.abs().max().item() == 0.0
    g_ref, g_strided, g_inplace = kl_grads
    torch.testing.assert_close(g_strided, g_ref, rtol=0, atol=0)
    torch.testing.assert_close(g_inplace, g_ref, rtol=0, atol=0)
    torch.testing.assert_close(fused_grads[1], fused_grads[0], rtol=0, atol=0)
    dense = ref.ref_grad_autograd("kl", s.double(), t.double(), None, w.double(), 1.3)
    torch.testing.assert_close(g_ref.double(), dense, rtol=1e-5, atol=1e-7)


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(2, 3)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert not use_triton(cpu, None) and not use_triton(cpu, "auto")  # CPU tensors: PyTorch path
    assert use_triton(cpu, "triton") and not use_triton(cpu, "torch")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert use_triton(cpu, None) and not use_triton(cpu, "torch")  # the argument wins over the variable
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=f"\\${BACKEND_ENV} must be one of"):
        use_triton(cpu, None)
    with pytest.raises(ValueError, match="backend must be one of"):
        use_triton(cpu, "fast")


def test_kernels_compile_for_hopper_without_a_gpu():
    """ptxas (shipped with triton) builds every kernel for sm_90 in bf16 and fp32."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from triton.runtime.jit import JITFunction

    from megatron_sdpg.ops import vocab_parallel_triton as vpt

    if not isinstance(vpt._row_stats_kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET is set in this process")
    target = GPUTarget("cuda", 90, 32)
    common = dict(n_cols="i32", s_stride="i64", t_stride="i64", inv_t="fp32", inv_t_teacher="fp32",
                  BLOCK_V="constexpr")
    for dt in ("bf16", "fp32"):
        ptrs = dict(s_ptr=f"*{dt}", t_ptr=f"*{dt}")
        grad = dict(grad_ptr=f"*{dt}", lse_s_ptr="*fp32", t_shift_ptr="*fp32", grad_stride="i64")
        kernels = [
            (vpt._row_stats_kernel, dict(stats_ptr="*fp32", n_rows="i32", WITH_ENTROPY="constexpr"), True),
            (vpt._row_stats_kernel, dict(stats_ptr="*fp32", n_rows="i32", WITH_ENTROPY="constexpr"), False),
            (vpt._kl_grad_kernel, dict(**grad, g_ptr="*fp32"), None),
            (vpt._fused_grad_kernel, dict(**grad, g_kl_ptr="*fp32", g_lp_ptr="*fp32", target_ptr="*i64"), None),
        ]
        for fn, extra, entropy in kernels:
            types = {**ptrs, **extra, **common}
            signature = {name: types[name] for name in fn.arg_names}
            constexprs = {"BLOCK_V": vpt.BLOCK_V}
            if entropy is not None:
                constexprs["WITH_ENTROPY"] = entropy
            compiled = compile(ASTSource(fn, signature, constexprs=constexprs), target=target,
                               options=dict(num_warps=vpt.NUM_WARPS))
            assert len(compiled.asm["cubin"]) > 0, (fn.__name__, dt)
