"""GPU checks of the foundation (skipped without CUDA).

* The same tiny training run as the layout-invariance test, on one GPU over
  NCCL, matches the CPU/gloo single-process run (fp32, TF32 off; relative 1e-4,
  looser than CPU-vs-CPU because cuBLAS sums in another order).
* A bf16 step of a ~100M-parameter Llama-style model (transformer-engine spec
  when TE is installed, else the local spec) runs, stays finite and lowers the loss.
"""

import os
import time

import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks
from tests.dist.test_layout_invariance import _train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train_gpu(rank, world_size):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return _train(rank, world_size, 1, 1)


def test_gpu_nccl_matches_cpu_gloo():
    gpu = run_on_ranks(_train_gpu, 1, backend="nccl", timeout=300)[0]
    cpu = run_on_ranks(_train, 1, 1, 1, timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})[0]
    print("gpu", gpu, "cpu", cpu)
    torch.testing.assert_close(torch.tensor(gpu, dtype=torch.float64), torch.tensor(cpu, dtype=torch.float64),
                               rtol=1e-4, atol=0)


def _bf16_step(rank, world_size):
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.models.builder import transformer_engine_available
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel, cross_entropy_loss

    groups = init_model_parallel(ParallelConfig(), seed=3)
    cfg = ModelConfig(arch="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, params_dtype="bfloat16")
    model = PolicyModel(cfg, groups, OptimizerConfig(lr=3e-4, lr_warmup_steps=0), total_steps=4)
    n_params = sum(p.numel() for _, p in model.named_parameters())
    tokens = torch.randint(0, 32000, (8, 513), generator=torch.Generator().manual_seed(0)).cuda()
    mbs = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(4, 512, device="cuda"),
                position_ids=torch.arange(512, device="cuda").expand(4, 512)) for t in tokens.split(4)]
    losses, times = [], []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = model.train_step(mbs, cross_entropy_loss)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert r.updated
        losses.append(r.metrics["ce"])
    return dict(params=n_params, losses=losses, step_s=times, te=transformer_engine_available(),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def test_bf16_100m_step():
    out = run_on_ranks(_bf16_step, 1, backend="nccl", timeout=300)[0]
    print("bf16 100M:", out)
    assert 80e6 < out["params"] < 200e6
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    assert out["losses"][-1] < out["losses"][0]
