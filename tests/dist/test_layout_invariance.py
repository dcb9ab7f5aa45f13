"""Every parallel layout trains the same model: equal losses and grad norms.

A tiny Qwen3-style model (GQA, qk-norm, a vocabulary that needs padding at TP2)
takes three AdamW steps on a fixed global batch of 8 sequences under
{1 rank, TP2, PP2, DP2 + distributed optimizer, TP2xPP2}. Each layout's
per-step loss and gradient norm must equal the single-process values.
Tolerance: relative 1e-5 (fp32; the layouts differ only in summation order).

In the same ranks a second model trains with the real SDPG objective through the
trainer's own pieces (``plan_microbatches``, the reference log-prob pass, the
teacher pass through every pipeline stage, ``sdpg_loss_fn``; ``algorithm.fused_output`` as
configured by default) at temperature 0.7,
on 8 samples whose prompts, teacher prompts and responses all differ in length
(one response is empty): micro-batches and DP ranks hold unequal token counts, so
a per-micro-batch or per-rank mean would differ from the global token mean.
"""

from functools import partial

import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks

STEPS = 3
LAYOUTS = {  # name: (tp, pp, world)
    "tp2": (2, 1, 2),
    "pp2": (1, 2, 2),
    "dp2_distopt": (1, 1, 2),
    "tp2xpp2": (2, 2, 4),
}


def _qwen3_tiny():
    from megatron_sdpg.models.architecture import ModelConfig

    return ModelConfig(arch="qwen3", vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       num_layers=2)


def _train(rank, world_size, tp, pp):
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel, cross_entropy_loss

    groups = init_model_parallel(ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=True), seed=7)
    cfg = ModelConfig(arch="qwen3", vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_layers=2)
    model = PolicyModel(cfg, groups, OptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.1),
                        use_distributed_optimizer=True, total_steps=STEPS)
    tokens = torch.randint(0, 101, (8, 17), generator=torch.Generator().manual_seed(0))
    dp, dp_rank = groups.layout.dp, groups.dp_rank
    mine = tokens[dp_rank * 8 // dp:(dp_rank + 1) * 8 // dp]
    microbatches = [
        dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(2, 16), position_ids=torch.arange(16).expand(2, 16))
        for t in mine.split(2)
    ]
    history = []
    for _ in range(STEPS):
        result = model.train_step(microbatches, cross_entropy_loss)
        assert result.updated
        history.append((result.metrics["ce"], result.grad_norm))
    return history, _train_sdpg(groups)


SDPG_STEPS = 2


def _train_sdpg(groups):
    """SDPG steps on ``_tiny_samples`` with the trainer's passes; per step (loss, grad norm, KL, ref KL, tokens)."""
    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    cfg = SDPGConfig()
    cfg.algorithm = apply_preset("sdpg", beta_base=0.5, beta_warmup_steps=0, beta_decay_steps=0, alpha=0.05,
                                 temperature=0.7)
    policy = PolicyModel(_qwen3_tiny(), groups, OptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.1),
                         use_distributed_optimizer=True, total_steps=SDPG_STEPS, seed=3)
    reference = PolicyModel(_qwen3_tiny(), groups, None, seed=3)
    samples = _tiny_samples(empty_tail=True)
    history = []
    for step in range(SDPG_STEPS):
        mbs = plan_microbatches(samples, groups.layout.dp, groups.dp_rank, 2, 0, 0, with_teacher=True)
        passes.log_prob_pass(reference, mbs, "ref_log_probs", 0.7)
        fused = cfg.algorithm.fused_output  # the default path (hidden states into ops.fused_output)
        passes.teacher_pass(policy, mbs, hidden=fused)
        for mb in mbs:
            mb["emit_hidden"] = fused
        result = policy.train_step(mbs, partial(sdpg_loss_fn, cfg, groups, step))
        assert result.updated
        m = result.metrics
        history.append((m["loss"], result.grad_norm, m["distill_kl"], m["ref_kl"], m["entropy"]))
    return history


@pytest.fixture(scope="module")
def single_process():
    return run_on_ranks(_train, 1, 1, 1, timeout=180)[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(single_process, name):
    tp, pp, world = LAYOUTS[name]
    results = run_on_ranks(_train, world, tp, pp, timeout=300)
    ref = torch.tensor(single_process[0], dtype=torch.float64)
    assert ref[-1, 0] < ref[0, 0], "loss must fall over the three steps"
    ref_sdpg = torch.tensor(single_process[1], dtype=torch.float64)
    assert (ref_sdpg[:, 2] > 0).all() and ref_sdpg[-1, 3] > 0, "the KL terms must be live"
    for rank, (history, sdpg) in enumerate(results):
        got = torch.tensor(history, dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0, msg=f"{name} rank {rank}")
        got = torch.tensor(sdpg, dtype=torch.float64)
        torch.testing.assert_close(got, ref_sdpg, rtol=1e-5, atol=1e-9,
                                   msg=lambda m: f"{name} rank {rank} SDPG (loss, grad norm, KL, ref KL, H): {m}")


def _rng_streams(rank, world_size):
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig

    groups = init_model_parallel(ParallelConfig(tp=2), seed=11)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        model_parallel = torch.rand(4)
    default = torch.rand(4)
    return groups.tp_rank, groups.dp_rank, model_parallel, default, dist.get_rank()


def test_model_parallel_rng_differs_across_tp_and_matches_across_dp():
    out = run_on_ranks(_rng_streams, 4, timeout=120)
    by_coord = {(tp, dp): (mp, default) for tp, dp, mp, default, _ in out}
    # Tensor-parallel ranks draw different model-parallel numbers...
    assert not torch.equal(by_coord[(0, 0)][0], by_coord[(1, 0)][0])
    # ...data-parallel replicas draw the same ones...
    assert torch.equal(by_coord[(0, 0)][0], by_coord[(0, 1)][0])
    assert torch.equal(by_coord[(1, 0)][0], by_coord[(1, 1)][0])
    # ...and the default stream is shared by the whole model-parallel group.
    assert torch.equal(by_coord[(0, 0)][1], by_coord[(1, 0)][1])


def _nan_step(rank, world_size):
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel, cross_entropy_loss

    groups = init_model_parallel(ParallelConfig(tp=2), seed=7)
    model = PolicyModel(ModelConfig(vocab_size=64, num_layers=1), groups, OptimizerConfig(lr=1e-2, lr_warmup_steps=0))
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mb = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(2, 8),
              position_ids=torch.arange(8).expand(2, 8))

    def poisoned(batch, logits):
        loss_sum, n, metrics = cross_entropy_loss(batch, logits)
        return loss_sum * float("nan") if rank == 1 else loss_sum, n, metrics

    before = [p.detach().clone() for _, p in model.named_parameters()]
    skipped = model.train_step([mb], poisoned)
    unchanged = all(torch.equal(a, p.detach()) for a, (_, p) in zip(before, model.named_parameters()))
    healthy = model.train_step([mb], cross_entropy_loss)
    moved = not all(torch.equal(a, p.detach()) for a, (_, p) in zip(before, model.named_parameters()))
    return skipped.updated, unchanged, healthy.updated, moved


def test_non_finite_gradient_on_one_rank_skips_the_update_everywhere():
    for skipped_updated, unchanged, healthy_updated, moved in run_on_ranks(_nan_step, 2, timeout=120):
        assert not skipped_updated and unchanged
        assert healthy_updated and moved


def _tiny_samples(empty_tail: bool):
    """TrainSamples with unequal prompt and response lengths; ``empty_tail``: the last response is empty."""
    from megatron_sdpg.train.batch import TrainSample

    g = torch.Generator().manual_seed(5)
    samples = []
    for i, (p_len, r_len) in enumerate([(4, 9), (6, 2), (3, 5), (5, 7), (7, 1), (4, 4), (6, 8), (5, 0)]):
        if r_len == 0 and not empty_tail:
            r_len = 3
        prompt = torch.randint(1, 101, (p_len,), generator=g).tolist()
        samples.append(TrainSample(
            group=i // 4, prompt_ids=prompt,
            teacher_prompt_ids=torch.randint(1, 101, (3,), generator=g).tolist() + prompt,  # privileged context
            response_ids=torch.randint(1, 101, (r_len,), generator=g).tolist(),
            rollout_log_probs=(-torch.rand(r_len, generator=g) * 4 - 0.5).tolist(),
            advantage=[1.2, -0.7, 0.4, 0.0][i % 4] * (1 if i < 4 else -1)))
    return samples


def _dr_grpo_grad_norms(rank, world_size):
    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train.batch import collate
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    groups = init_model_parallel(ParallelConfig(), seed=7)
    samples = _tiny_samples(empty_tail=True)[5:]  # 3 sequences, the last one's response empty
    mb = collate(samples, 0, 16, None)
    out = {}
    for agg, constant in (("constant", 2.5), ("seq-mean-token-sum", None)):
        cfg = SDPGConfig()
        cfg.algorithm = apply_preset("grpo", alpha=0.0, loss_agg=agg, loss_agg_constant=constant)
        model = PolicyModel(_qwen3_tiny(), groups, OptimizerConfig(lr=1e-3, lr_warmup_steps=0))
        result = model.train_step([dict(mb)], partial(sdpg_loss_fn, cfg, groups, 0))
        out[agg] = (result.grad_norm, result.metrics["loss"])
    return out


def test_dr_grpo_normaliser_counts_trailing_empty_responses_and_is_not_truncated():
    """``constant`` (Dr.GRPO) divides by C * (every sequence, empty ones too), exactly.

    Same weights, same token losses: against seq-mean-token-sum (divides by the 2 non-empty
    sequences) the gradient norm must scale by 2 / (2.5 * 3). Before: 2 / 5 (the trailing empty
    response was not counted) and 2 / 7 (7.5 was truncated to an int).
    """
    out = run_on_ranks(_dr_grpo_grad_norms, 1, timeout=180)[0]
    (g_const, loss_const), (g_seq, loss_seq) = out["constant"], out["seq-mean-token-sum"]
    assert g_seq > 0
    assert g_const == pytest.approx(g_seq * 2 / 7.5, rel=1e-5), (g_const / g_seq, 2 / 7.5)
    assert loss_const == pytest.approx(loss_seq * 2 / 7.5, rel=1e-5)
