"""The planner against what can be measured here: parameters of built models and CPU peak memory.

1. Parameters per rank of megatron ``GPTModel`` chunks built at TP2 x PP2 (Qwen2:
   QKV bias, a vocabulary that needs padding) and on one rank (Qwen3: q/k norms,
   tied embeddings) equal the planner's per-stage counts exactly.
2. Peak memory of two real ``PolicyModel.train_step`` calls (fp32, AdamW, megatron
   DDP, one gloo rank) is measured as the peak RSS (``ru_maxrss``) minus the RSS
   just before the model is built, with glibc returning large blocks to the OS at
   once (``MALLOC_MMAP_THRESHOLD_``) so RSS follows live memory. The planner's
   per-GPU peak for the same configuration, with the local-spec kernels and torch's
   AdamW that run on CPU, must be within 20%: once where the model states dominate
   and once where activations (unfused attention included) are the larger part.
3. The same for an SDPG step whose last-stage vocabulary and teacher terms dominate, through
   the trainer's pieces, on logits and with ``algorithm.fused_output``, the teacher per
   micro-batch (inline) and its pre-pass (every micro-batch's teacher data kept).
"""

from __future__ import annotations

import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks

TOLERANCE = 0.20


def _param_counts(rank, world_size, tp, pp, cfg_kwargs):
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.models.builder import build_model_chunks
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig

    groups = init_model_parallel(ParallelConfig(tp=tp, pp=pp), seed=0)
    chunks = build_model_chunks(ModelConfig(**cfg_kwargs), groups)
    return groups.pp_rank, sum(p.numel() for c in chunks for p in c.parameters())


@pytest.mark.parametrize("tp, pp, world, cfg", [
    (2, 2, 4, dict(arch="qwen2", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=4,
                   num_attention_heads=4, num_key_value_heads=2)),
    (1, 1, 1, dict(arch="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
])
def test_parameter_counts_match_built_model(tp, pp, world, cfg):
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.planning.params import stage_params

    expected = stage_params(ModelConfig(**cfg), tp, pp)
    for stage, count in run_on_ranks(_param_counts, world, tp, pp, cfg, timeout=180):
        assert count == expected[stage].total, f"stage {stage}"


def _peak_memory(rank, world_size, cfg_kwargs, b, s, distributed_optimizer):
    import resource

    import psutil

    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel, cross_entropy_loss

    groups = init_model_parallel(ParallelConfig(use_distributed_optimizer=distributed_optimizer), seed=1)
    cfg = ModelConfig(**cfg_kwargs)
    data = torch.randint(0, cfg.vocab_size, (2, b, s + 1), generator=torch.Generator().manual_seed(0))
    mbs = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(b, s),
                position_ids=torch.arange(s).expand(b, s)) for t in data]
    before = psutil.Process().memory_info().rss
    model = PolicyModel(cfg, groups, OptimizerConfig(lr=1e-4, lr_warmup_steps=0),
                        use_distributed_optimizer=distributed_optimizer, total_steps=4)
    for _ in range(2):  # the second step runs with Adam's states allocated
        assert model.train_step(mbs, cross_entropy_loss).updated
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - before


@pytest.mark.parametrize("name, cfg, b, s, distopt", [
    ("model states dominate", dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=512), 2, 64, True),
    ("activations dominate", dict(hidden_size=256, intermediate_size=768, num_layers=4, num_attention_heads=8,
                                  num_key_value_heads=4, vocab_size=512), 4, 384, False),
])
def test_planner_memory_within_20_percent_of_measured(monkeypatch, name, cfg, b, s, distopt):
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.planning.assumptions import PlanAssumptions
    from megatron_sdpg.planning.memory import estimate_memory
    from megatron_sdpg.planning.workload import Workload
    from megatron_sdpg.platform.layout import ParallelConfig, ParallelLayout

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    cfg = dict(arch="llama", **cfg)
    measured = run_on_ranks(_peak_memory, 1, cfg, b, s, distopt, timeout=300)[0]
    # The same step for the planner: b sequences of s tokens (one "prompt" token, s - 1 trained),
    # two micro-batches, no teacher or reference pass (a plain cross-entropy loss).
    work = Workload(prompt_tokens=1, teacher_prompt_tokens=1, response_tokens=s - 1, sequences_per_step=2 * b,
                    micro_batch_size=b, teacher_forward=False, reference_model=False)
    assume = PlanAssumptions(fused_kernels=False, fused_optimizer=False)
    stage = estimate_memory(ModelConfig(**cfg), ParallelLayout.resolve(ParallelConfig(), 1), work, assume, distopt)[0]
    ratio = stage.peak / measured
    print(f"{name}: planned {stage.peak / 2**20:.1f} MiB (static {stage.static / 2**20:.1f}, activations "
          f"{stage.activations / 2**20:.1f}), measured {measured / 2**20:.1f} MiB, ratio {ratio:.3f}")
    if name == "activations dominate":
        assert stage.activations > stage.static
    else:
        assert stage.static > 5 * stage.working
    assert abs(ratio - 1) <= TOLERANCE, f"{name}: planned/measured = {ratio:.3f}"


# 3. The last stage's vocabulary and teacher terms: one rank trains an SDPG step through the trainer's pieces
#    (plan_microbatches, the teacher inline per micro-batch or its pre-pass, sdpg_loss_fn) on a model whose
#    vocabulary terms dominate (V = 16,384 against h = 64), on logits and with algorithm.fused_output.
SDPG_MODEL = dict(arch="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=16384)
SDPG_SHAPE = dict(b=2, m=4, prompt=8, context=24, response=504)  # student 512 tokens, teacher 536


def _sdpg_samples(shape, vocab):
    from megatron_sdpg.train.batch import TrainSample

    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(shape["b"] * shape["m"]):
        prompt = torch.randint(1, vocab, (shape["prompt"],), generator=g).tolist()
        out.append(TrainSample(
            group=i // 2, prompt_ids=prompt,
            teacher_prompt_ids=torch.randint(1, vocab, (shape["context"],), generator=g).tolist() + prompt,
            response_ids=torch.randint(1, vocab, (shape["response"],), generator=g).tolist(),
            rollout_log_probs=(-torch.rand(shape["response"], generator=g) * 4 - 0.5).tolist(),
            advantage=1.0 if i % 2 else -1.0))
    return out


def _sdpg_peak_memory(rank, world_size, fused, inline):
    import resource
    from functools import partial

    import psutil

    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    groups = init_model_parallel(ParallelConfig(), seed=1)
    cfg = SDPGConfig()
    cfg.algorithm = apply_preset("sdpg", beta_base=0.5, beta_warmup_steps=0, beta_decay_steps=0, alpha=0.0,
                                 fused_output=fused, vocab_chunk_size=128)
    samples = _sdpg_samples(SDPG_SHAPE, SDPG_MODEL["vocab_size"])
    before = psutil.Process().memory_info().rss
    policy = PolicyModel(ModelConfig(**SDPG_MODEL), groups, OptimizerConfig(lr=1e-4, lr_warmup_steps=0),
                         use_distributed_optimizer=False, total_steps=4)
    for step in range(2):  # the second step runs with Adam's states allocated
        mbs = plan_microbatches(samples, 1, 0, SDPG_SHAPE["b"], 0, 0, with_teacher=True)
        assert len(mbs) == SDPG_SHAPE["m"]
        if inline:
            for mb in mbs:
                mb["inline_teacher"] = True
        else:
            passes.teacher_pass(policy, mbs, hidden=fused)
        for mb in mbs:
            mb["emit_hidden"] = fused
        assert policy.train_step(mbs, partial(sdpg_loss_fn, cfg, groups, step)).updated
        del mbs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - before


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_output"])
@pytest.mark.parametrize("inline", [True, False], ids=["teacher_per_microbatch", "teacher_prepass"])
def test_planner_vocabulary_and_teacher_terms_within_20_percent_of_measured(monkeypatch, fused, inline):
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.planning.assumptions import PlanAssumptions
    from megatron_sdpg.planning.memory import estimate_memory
    from megatron_sdpg.planning.workload import Workload
    from megatron_sdpg.platform.layout import ParallelConfig, ParallelLayout

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    measured = run_on_ranks(_sdpg_peak_memory, 1, fused, inline, timeout=300)[0]
    sh = SDPG_SHAPE
    work = Workload(prompt_tokens=sh["prompt"], teacher_prompt_tokens=sh["prompt"] + sh["context"],
                    response_tokens=sh["response"], sequences_per_step=sh["b"] * sh["m"], micro_batch_size=sh["b"],
                    teacher_forward=True, reference_model=False, kl_chunk_size=128, fused_output=fused,
                    teacher_per_microbatch=inline)
    assume = PlanAssumptions(fused_kernels=False, fused_optimizer=False)
    stage = estimate_memory(ModelConfig(**SDPG_MODEL), ParallelLayout.resolve(ParallelConfig(), 1), work, assume,
                            False)[0]
    ratio = stage.peak / measured
    print(f"fused_output={fused} inline={inline}: planned {stage.peak / 2**20:.1f} MiB (static "
          f"{stage.static / 2**20:.1f}, activations {stage.activations / 2**20:.1f}, logits/KL "
          f"{stage.logits_and_kl / 2**20:.1f}, teacher {stage.teacher_logits / 2**20:.1f}), measured "
          f"{measured / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, f"planned/measured = {ratio:.3f}"
