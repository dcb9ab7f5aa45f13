"""Logits only at response rows train exactly like logits at every position.

The student, teacher, reference and old-policy passes run the output layer on
the ``T`` rows that predict a response token (``PolicyModel.select_response_rows``,
the default) instead of all ``b * s`` positions. A tiny Qwen3-style model
(vocabulary 101: padded at TP2) takes two SDPG steps through the trainer's
pieces (``plan_microbatches``, reference and old-policy log-prob passes, the
teacher inline at PP1 or through both stages at PP2, ``sdpg_loss_fn``) at
temperature 0.7 on samples of unequal prompt/teacher/response lengths (one
response empty), once as before (every position, every micro-batch one shape)
and once as the trainer now runs (the selected rows; at PP1 micro-batches
bucketed by length, each padded to its own longest), on logits and with
``algorithm.fused_output``, at 1 rank, TP2, PP2 and DP2. Loss, grad norm, KL terms, entropy
must agree to 1e-5 relative, and the first step's stored reference/old(/pre-pass
teacher) tensors to 1e-5 absolute (fp32: only padded lengths and matmul shapes differ). A forward hook counts the rows the output layer
computed: ``T`` per micro-batch when selecting, ``b * s`` otherwise.
"""

from functools import partial

import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks
from tests.dist.test_layout_invariance import _tiny_samples

STEPS = 2


def _history(groups, select: bool, fused: bool, inline: bool):
    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    def tiny():
        return ModelConfig(arch="qwen3", vocab_size=101, hidden_size=64, num_attention_heads=4,
                           num_key_value_heads=2, num_layers=2)

    cfg = SDPGConfig()
    cfg.algorithm = apply_preset("sdpg", beta_base=0.5, beta_warmup_steps=0, beta_decay_steps=0, alpha=0.05,
                                 temperature=0.7, fused_output=fused)
    policy = PolicyModel(tiny(), groups, OptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.1),
                         use_distributed_optimizer=True, total_steps=STEPS, seed=3)
    reference = PolicyModel(tiny(), groups, None, seed=3)
    rows_computed = []
    for model in (policy, reference):
        model.select_response_rows = select
        for chunk in model.unwrapped():
            if chunk.post_process:
                chunk.output_layer.register_forward_hook(
                    lambda mod, args, out: rows_computed.append(out[0].shape[0] * out[0].shape[1]))
    history, stored, expected_rows = [], [], []
    for step in range(STEPS):
        # The new path as the trainer runs it: at PP1 bucketed by length, each micro-batch its own shape
        bucket = select and groups.layout.pp == 1
        mbs = plan_microbatches(_tiny_samples(empty_tail=True), groups.layout.dp, groups.dp_rank, 2, 0, 0,
                                with_teacher=True, one_shape=not bucket, sort_by_length=bucket)
        if bucket and groups.layout.dp == 1:
            assert len({mb["tokens"].shape for mb in mbs}) > 1, "the micro-batches must differ in shape"
        passes.log_prob_pass(reference, mbs, "ref_log_probs", 0.7)
        passes.log_prob_pass(policy, mbs, "old_log_probs", 0.7)
        if inline:
            for mb in mbs:
                mb["inline_teacher"] = True
        else:
            passes.teacher_pass(policy, mbs, hidden=fused)
        for mb in mbs:
            mb["emit_hidden"] = fused
            # reference, old policy, teacher, student: T rows each when selecting
            t = mb["resp_rows"].numel()
            expected_rows += [t] * 4 if select else [mb["tokens"].numel()] * 3 + [mb["teacher_tokens"].numel()]
        result = policy.train_step(mbs, partial(sdpg_loss_fn, cfg, groups, step))
        assert result.updated
        m = result.metrics
        history.append((m["loss"], result.grad_norm, m["distill_kl"], m["ref_kl"], m["entropy"]))
        if groups.is_last_stage:
            key = "teacher_hidden" if fused else "teacher_logits"  # the pre-pass keeps them (inline: not)
            # Per sample, in sample order (bucketing reorders the micro-batches' content)
            stored.append(_per_sample(mbs, ["ref_log_probs", "old_log_probs"] + ([] if inline else [key])))
    if not groups.is_last_stage:
        return history, None, None
    return history, stored, (sorted(rows_computed), sorted(expected_rows))


def _per_sample(mbs: list[dict], keys: list[str]) -> list[tuple]:
    """The ``keys``' ``[T, ...]`` rows of each sample, keyed by its (non-zero) tokens: any batching gives one order."""
    out = {}
    for mb in mbs:
        for j in range(mb["num_sequences"]):
            rows = mb["seq_index"] == j
            seq = mb["tokens"][j]
            out[tuple(seq[seq != 0].tolist())] = tuple(mb[k][rows] for k in keys)
    return [out[j] for j in sorted(out)]


def _both(rank, world_size, tp, pp, cases):
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig

    groups = init_model_parallel(ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=True), seed=7)
    return [(_history(groups, False, **c), _history(groups, True, **c)) for c in cases]


LAYOUTS = {  # name: (tp, pp, world, cases)
    "single": (1, 1, 1, [dict(fused=False, inline=True), dict(fused=True, inline=True)]),
    "tp2": (2, 1, 2, [dict(fused=False, inline=True), dict(fused=True, inline=False)]),
    "pp2": (1, 2, 2, [dict(fused=False, inline=False)]),
    "dp2": (1, 1, 2, [dict(fused=False, inline=True)]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_response_rows_equal_every_position(name):
    tp, pp, world, cases = LAYOUTS[name]
    for rank, per_case in enumerate(run_on_ranks(_both, world, tp, pp, cases, timeout=300)):
        for case, (full, selected) in zip(cases, per_case):
            where = f"{name} {case} rank {rank}"
            ref = torch.tensor(full[0], dtype=torch.float64)
            assert (ref[:, 2] > 0).all() and ref[-1, 3] > 0, "the KL terms must be live"
            torch.testing.assert_close(torch.tensor(selected[0], dtype=torch.float64), ref, rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"{where} (loss, grad norm, KL, ref KL, H): {m}")
            if full[1] is None:
                continue
            # Stored tensors of the first step (same weights; the second step's weights already differ
            # by rounding that Adam amplifies on near-zero gradients: its loss and grad norm are checked above)
            for step_full, step_sel in zip(full[1][:1], selected[1][:1]):
                assert len(step_full) == len(step_sel)
                for mb_full, mb_sel in zip(step_full, step_sel):
                    for a, b in zip(mb_full, mb_sel):
                        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
            for rows_computed, expected in (full[2], selected[2]):
                assert rows_computed == expected, where
            sel_rows, full_rows = sum(selected[2][0]), sum(full[2][0])
            assert sel_rows < full_rows, (where, sel_rows, full_rows)
