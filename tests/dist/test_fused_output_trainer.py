"""``algorithm.fused_output`` trains exactly like the logits path through the trainer's pieces.

A tiny Qwen3-style model (vocabulary 101: padded at TP2) takes two training steps
(temperature 0.7, unequal prompt/teacher/response lengths, an empty response)
with ``plan_microbatches``, the reference log-prob pass, the teacher (inline per
micro-batch, the pre-pass of the current weights as with several updates per step,
or the frozen initial policy's pre-pass as OPSD has it, at PP1 and through both
stages at PP2) and ``sdpg_loss_fn``; once on logits (``algorithm.fused_output=false``),
once with ``fused_output`` (hidden states and the output shard into
``ops.fused_output``). Objectives: SDPG (reverse KL with and without the divergence
mask, forward KL with the student-only teacher temperature, JSD), GRPO (beta 0: no
teacher) and OPSD (JSD with the per-entry clip). Loss, grad norm, distillation KL,
reference KL, entropy and the divergence-mask fraction must agree to 1e-5
relative, per layout, in tied and untied embeddings. Without the divergence mask the
op takes its gradients during the forward (``eager_loss``) and must not fall back.
"""

import warnings
from functools import partial

import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks
from tests.dist.test_layout_invariance import _tiny_samples

STEPS = 2


SDPG = dict(beta_base=0.5, beta_warmup_steps=0, beta_decay_steps=0, alpha=0.05)


def _history(groups, fused: bool, tied: bool, teacher: str | None, mask_after: bool = False, preset: str = "sdpg",
             algo: dict | None = None):
    """Per step ``(loss, grad norm, KL, ref KL, H, masked)``; ``teacher``: inline, prepass, initial or None."""
    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    def tiny():
        return ModelConfig(arch="qwen3", vocab_size=101, hidden_size=64, num_attention_heads=4,
                           num_key_value_heads=2, num_layers=2, tie_word_embeddings=tied)

    cfg = SDPGConfig()
    cfg.algorithm = apply_preset(preset, temperature=0.7, fused_output=fused, distill_mask_after_divergence=mask_after,
                                 **(SDPG if algo is None else algo))
    policy = PolicyModel(tiny(), groups, OptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.1),
                         use_distributed_optimizer=True, total_steps=STEPS, seed=3)
    reference = PolicyModel(tiny(), groups, None, seed=3)
    out = []
    for step in range(STEPS):
        mbs = plan_microbatches(_tiny_samples(empty_tail=True), groups.layout.dp, groups.dp_rank, 2, 0, 0,
                                with_teacher=teacher is not None)
        passes.log_prob_pass(reference, mbs, "ref_log_probs", 0.7)
        if teacher == "inline":  # the current weights, per micro-batch right before its student view
            for mb in mbs:
                mb["inline_teacher"] = True
        elif teacher is not None:  # the pre-pass: the current weights, or the frozen initial policy (OPSD)
            passes.teacher_pass(reference if teacher == "initial" else policy, mbs, hidden=fused)
        for mb in mbs:
            mb["emit_hidden"] = fused
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = policy.train_step(mbs, partial(sdpg_loss_fn, cfg, groups, step))
        # Without the divergence mask the loss is per-token: the op's forward-time gradients are used.
        assert not any("recomputing" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert result.updated
        m = result.metrics
        out.append((m["loss"], result.grad_norm, m.get("distill_kl", 0.0), m["ref_kl"], m["entropy"],
                    m.get("distill_masked_frac", 0.0)))
        if fused and groups.is_last_stage:
            assert all("teacher_logits" not in mb for mb in mbs)
    return out


def _both_paths(rank, world_size, tp, pp, cases):
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig

    groups = init_model_parallel(ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=True), seed=7)
    return [(_history(groups, False, **c), _history(groups, True, **c)) for c in cases]


OPSD = dict(pointwise_clip=3.0)  # the preset (JSD 0.5, frozen initial teacher) with the per-entry clip
FORWARD_KL = dict(SDPG, distill_divergence="forward_kl", teacher_temperature_scaling="student_only")
LAYOUTS = {  # name: (tp, pp, cases)
    "single_inline": (1, 1, [dict(tied=False, teacher="inline", mask_after=True),
                             dict(tied=False, teacher=None, preset="grpo", algo=dict(alpha=0.05)),  # beta = 0
                             dict(tied=True, teacher="initial", preset="opsd", algo=OPSD),
                             dict(tied=False, teacher="prepass", algo=FORWARD_KL)]),  # several updates a step
    "tp2_inline_tied": (2, 1, [dict(tied=True, teacher="inline"),
                               dict(tied=False, teacher="prepass", preset="sdpg", mask_after=True,
                                    algo=dict(SDPG, distill_divergence="jsd"))]),
    "pp2_prepass": (1, 2, [dict(tied=True, teacher="prepass"),
                           dict(tied=False, teacher="initial", preset="opsd", algo=OPSD)]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fused_output_equals_logits_path_in_training(name):
    tp, pp, cases = LAYOUTS[name]
    for rank, per_case in enumerate(run_on_ranks(_both_paths, tp * pp, tp, pp, cases, timeout=600)):
        for case, (logits, fused) in zip(cases, per_case):
            ref = torch.tensor(logits, dtype=torch.float64)
            if case["teacher"] is not None:
                assert (ref[:, 2] > 0).all(), "the distillation term must be live"
            if case.get("preset", "sdpg") != "opsd":
                assert ref[-1, 3] > 0, "the reference KL must be live"
            if case.get("mask_after"):
                assert (ref[:, 5] > 0).any(), "the divergence mask must bite"
            torch.testing.assert_close(torch.tensor(fused, dtype=torch.float64), ref, rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"{name} {case} rank {rank} (loss, grad norm, KL, ref KL, "
                                                     f"H, masked): {m}")
