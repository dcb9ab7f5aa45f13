"""The teacher inside the pipeline schedule trains exactly like the pre-pass, at any PP, in bounded memory.

A tiny Qwen3-style model (vocabulary 101: padded at TP2) takes two steps through
the trainer's pieces (``plan_microbatches``, the reference log-prob pass,
``sdpg_loss_fn``) on samples whose prompts, teacher prompts and responses all
differ in length (one response is empty), so the micro-batches hold unequal
token counts. The teacher view of each micro-batch runs inside the update's
schedule (every stage: teacher rows without gradient, student rows with it,
sent on concatenated), on logits and with ``algorithm.fused_output``:

* SDPG, current-weights teacher, one update per step;
* OPSD, the frozen initial policy as teacher (another model's chunks), two
  updates per step;
* the authors' ``teacher_per_microbatch`` with two updates per step (the teacher
  of the weights of the moment: formerly refused at PP > 1).

Per update, the loss, the grad norm and every metric must equal the single
process to 1e-5 relative (1e-6 absolute), at PP2 and TP2xPP2; where a pre-pass
computes the same teacher (the first two cases) the single process must also
equal the pre-pass, and with ``teacher_per_microbatch`` its second update must
differ from the pre-pass's (the teacher really has the updated weights). Adam
runs with ``adam_eps=1`` (a scaled gradient step): at the usual 1e-8 its first
step is sign(g), which turns fp32 noise in near-zero gradient entries into
differences of a whole learning rate, and the second update of a step would see
layout noise of 1e-4 instead of 1e-6.

Memory: :class:`TeacherMemory` counts the bytes of teacher data alive (freed
storage, not intent). On the last stage the schedule holds one micro-batch's
``[T, V/tp]`` logits (``[T, h]`` hidden states) at a time, where the pre-pass
holds all eight; on the stages of PP2 the teacher halves of the ``[s_t, b, h]``
activations in flight (see :func:`_teacher_bounds`).
"""

from functools import partial

import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks
from tests.dist.test_layout_invariance import _tiny_samples

STEPS = 2
MBS = 1  # eight micro-batches per step at DP1: the pre-pass holds eight, the schedule the ones in flight
# fp32: the KL terms (~1e-2) are differences of ~4.6-nat cross-entropies, so their rounding is ~1e-7 absolute.
RTOL, ATOL = 1e-5, 1e-6
CASES = {  # name: (preset, overrides, mini-batches per step, pre-pass equivalent)
    "sdpg": ("sdpg", dict(alpha=0.05), 1, True),
    "opsd_frozen_teacher": ("opsd", dict(), 2, True),
    "authors_per_microbatch": ("sdpg", dict(alpha=0.05, teacher_per_microbatch=True), 2, False),
}


def _tiny():
    from megatron_sdpg.models.architecture import ModelConfig

    return ModelConfig(arch="qwen3", vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       num_layers=2)


def _train(groups, case: str, fused: bool, in_schedule: bool):
    """Two steps like ``Trainer.train_one_step``; per update the metrics, and per step the teacher peak bytes."""
    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel
    from megatron_sdpg.train.teacher_memory import TeacherMemory
    from megatron_sdpg.train.trainer import _split

    preset, overrides, mini_batches, _ = CASES[case]
    cfg = SDPGConfig()
    cfg.algorithm = apply_preset(preset, beta_base=0.5, beta_warmup_steps=0, beta_decay_steps=0, temperature=0.7,
                                 fused_output=fused, **overrides)
    policy = PolicyModel(_tiny(), groups, OptimizerConfig(lr=0.05, adam_eps=1.0, lr_warmup_steps=0, weight_decay=0.1),
                         use_distributed_optimizer=True, total_steps=STEPS, seed=3)
    reference = PolicyModel(_tiny(), groups, None, seed=3)
    teacher = reference if cfg.algorithm.teacher_source == "initial" else policy
    updates, peaks = [], []
    for step in range(STEPS):
        mbs = plan_microbatches(_tiny_samples(empty_tail=True), groups.layout.dp, groups.dp_rank, MBS, 0, 0,
                                with_teacher=True)
        if cfg.algorithm.alpha > 0:
            passes.log_prob_pass(reference, mbs, "ref_log_probs", 0.7)
        if mini_batches > 1:
            passes.log_prob_pass(policy, mbs, "old_log_probs", 0.7)
        memory = TeacherMemory()
        if not in_schedule:
            passes.teacher_pass(teacher, mbs, hidden=fused, memory=memory)
        for mb in mbs:
            mb["emit_hidden"], mb["inline_teacher"] = fused, in_schedule
        for subset in _split(mbs, mini_batches):
            result = policy.train_step(subset, partial(sdpg_loss_fn, cfg, groups, step),
                                       teacher=teacher if in_schedule else None, teacher_memory=memory)
            assert result.updated
            updates.append({"grad_norm": result.grad_norm, **result.metrics})
        if fused and groups.is_last_stage:
            assert all("teacher_logits" not in mb for mb in mbs)
        del mbs  # the pre-pass's teacher data lives as long as the step's micro-batches
        peaks.append((memory.peak, memory.live))
    return updates, peaks


def _teacher_bounds(groups, fused: bool) -> tuple[int, int, int]:
    """(lower, upper) bound of this rank's in-schedule teacher peak, and the pre-pass's peak; bytes (fp32).

    Megatron's 1F1B holds ``min(pp - stage, n)`` micro-batches in flight on a
    stage, and one more while the previous one's tensor is still in a local
    variable of the schedule loop: ``min(pp - stage + 1, n)`` teacher halves
    ``[s_t, b, h]`` of the activations sent (first stage) or received (last
    stage). The last stage adds one micro-batch's teacher logits (hidden states)
    kept for the loss; the pre-pass keeps every micro-batch's.
    """
    from megatron_sdpg.train.batch import plan_microbatches

    mbs = plan_microbatches(_tiny_samples(empty_tail=True), groups.layout.dp, groups.dp_rank, MBS, 0, 0,
                            with_teacher=True)
    h, v_shard = 64, _tiny().padded_vocab_size(groups.layout.tp) // groups.layout.tp
    b, s_t = mbs[0]["teacher_tokens"].shape
    pp, stage = groups.layout.pp, groups.pp_rank
    activations = min(pp - stage + 1, len(mbs)) * s_t * b * h * 4 if pp > 1 else 0
    kept = [mb["teacher_resp_rows"].numel() * (h if fused else v_shard) * 4 for mb in mbs]
    if not groups.is_last_stage:
        return activations, activations, 0
    return activations + (max(kept) if pp == 1 else 0), activations + max(kept), sum(kept)


def _run(rank, world_size, tp, pp, fused):
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig

    groups = init_model_parallel(ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=True), seed=7)
    out = {}
    for case, (_, _, _, has_prepass) in CASES.items():
        out[case] = _train(groups, case, fused, in_schedule=True)
        if world_size == 1:  # the step-start teacher: equal where the weights have not moved (has_prepass)
            out[case + "/prepass"] = _train(groups, case, fused, in_schedule=False)
    return out, _teacher_bounds(groups, fused), groups.is_last_stage


def _as_table(updates: list[dict]) -> tuple[list[str], torch.Tensor]:
    names = sorted(updates[0])
    return names, torch.tensor([[u[n] for n in names] for u in updates], dtype=torch.float64)


@pytest.fixture(scope="module", params=[False, True], ids=["logits", "fused_output"])
def single_process(request):
    return request.param, run_on_ranks(_run, 1, 1, 1, request.param, timeout=240)[0]


def test_single_process_in_schedule_equals_prepass_and_holds_one_microbatch(single_process):
    fused, (out, (one_mb, _, all_mbs), _) = single_process
    for case, (_, _, _, has_prepass) in CASES.items():
        names, ref = _as_table(out[case][0])
        assert any("kl" in n or "jsd" in n for n in names), names
        names_pre, pre = _as_table(out[case + "/prepass"][0])
        assert names_pre == names
        if has_prepass:
            torch.testing.assert_close(ref, pre, rtol=RTOL, atol=ATOL, msg=lambda m: f"{case} {names}: {m}")
        else:  # teacher_per_microbatch: the second update's teacher has the first update's weights
            kl = names.index("distill_kl")
            torch.testing.assert_close(ref[0], pre[0], rtol=RTOL, atol=ATOL)
            assert ((ref[1::2, kl] - pre[1::2, kl]).abs() > 1e-3 * pre[1::2, kl].abs()).all(), (ref[:, kl], pre[:, kl])
        assert [p for p, _ in out[case + "/prepass"][1]] == [all_mbs] * STEPS, (case, all_mbs)
        assert [p for p, _ in out[case][1]] == [one_mb] * STEPS, (case, one_mb)
        assert all(live == 0 for _, live in out[case][1])
    assert all_mbs >= 4 * one_mb  # eight micro-batches of unequal token counts (responses of 0 to 9 tokens)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_pipeline_layouts_equal_single_process_in_bounded_teacher_memory(single_process, tp, pp):
    fused, (ref_out, _, _) = single_process
    results = run_on_ranks(_run, tp * pp, tp, pp, fused, timeout=420)
    for rank, (out, (lower, upper, _), last) in enumerate(results):
        for case in CASES:
            names, ref = _as_table(ref_out[case][0])
            got_names, got = _as_table(out[case][0])
            assert got_names == names
            torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"tp{tp} pp{pp} rank {rank} {case} {names}: {m}")
            for peak, live in out[case][1]:
                assert lower <= peak <= upper and live == 0, (rank, case, last, peak, live, lower, upper)
