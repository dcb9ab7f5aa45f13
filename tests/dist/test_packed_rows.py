"""Packed micro-batch rows (``train.pack_sequences``) give the log-probs and the update of one row a sequence.

Packing puts several sequences into one row of a micro-batch, with positions
restarting at 0 per sequence and a block-diagonal causal attention mask; megatron's
RoPE still rotates by the row position, so a later sequence of a row is rotated
by an offset, which attention scores do not see (they depend on position
differences only) up to float rounding. Checked here:

* the placement (``pack_rows``) and the mask of ``collate``: every sequence in
  one row, none overlapping, each position attending to earlier positions of its
  own sequence only;
* the student and the teacher view of packed micro-batches (unequal prompt,
  context and response lengths; the teacher inline in the schedule) against a
  float64 ``transformers`` forward of each sequence on its own, at temperature
  0.7, at TP1 and at TP2 (vocabulary shards compared with float64 directly):
  1e-5 absolute on log-probs, on a tiny Llama with GQA and Llama-3 RoPE scaling
  whose rows really hold several sequences;
* two SDPG steps (teacher inline, k3 reference KL, temperature 0.7) packed and
  padded, at 1 rank (also with ``algorithm.fused_output``), TP2 and DP2: loss, grad norm, distillation KL, reference KL
  and entropy agree to 1e-5 relative; in bf16 at 1 rank, the first step's to 2e-2.
"""

import os

import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks

TEMPERATURE = 0.7


def _samples(n: int = 12, vocab: int = 128):
    from megatron_sdpg.train.batch import TrainSample

    gen = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        p = torch.randint(3, vocab, (3 + i % 4,), generator=gen).tolist()
        ctx = torch.randint(3, vocab, (2 + i % 3,), generator=gen).tolist()
        r = torch.randint(3, vocab, ([9, 2, 5, 1, 7, 3, 12, 4][i % 8],), generator=gen).tolist()
        out.append(TrainSample(group=i // 4, prompt_ids=p, teacher_prompt_ids=p[:1] + ctx + p[1:], response_ids=r,
                               rollout_log_probs=(-torch.rand(len(r), generator=gen) * 3 - 0.2).tolist(),
                               advantage=[1.1, -0.6, 0.3, -0.8][i % 4]))
    return out


# ------------------------------------------------------------------------------------------ placement


def test_pack_rows_places_every_sequence_once_without_overlap():
    from megatron_sdpg.train.batch import pack_rows

    lengths = [7, 3, 8, 1, 5, 5, 2, 8, 4, 6]
    placement = pack_rows(lengths, 8)
    used: dict[int, set[int]] = {}
    for n, (row, offset) in zip(lengths, placement):
        cells = set(range(offset, offset + n))
        assert offset >= 0 and offset + n <= 8
        assert not cells & used.get(row, set()), (row, offset, n)
        used.setdefault(row, set()).update(cells)
    assert len(used) == -(-sum(lengths) // 8), "first-fit decreasing fills these rows completely"
    assert pack_rows(lengths, 8) == placement
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([9], 8)


def test_collate_packed_mask_keeps_sequences_apart():
    from megatron_sdpg.train.batch import collate

    samples = _samples(6)
    mb = collate(samples, 0, 24, 32, pack=True)
    tokens, mask, pos = mb["tokens"], mb["attention_mask"][:, 0], mb["position_ids"]
    assert tokens.shape[0] < len(samples), "some row must hold several sequences"
    flat_tokens = tokens.reshape(-1)
    # The response rows predict each response token, in sample order.
    target_at = flat_tokens[mb["resp_rows"] + 1]
    assert torch.equal(target_at, mb["target"])
    for row in range(tokens.shape[0]):
        starts = (pos[row] == 0).nonzero()[:, 0].tolist()
        for q in range(tokens.shape[1]):
            seq_start = max(s for s in starts if s <= q)
            for k in range(tokens.shape[1]):
                allowed = not mask[row, q, k]
                if tokens[row, q] != 0 and tokens[row, k] != 0:  # both positions hold tokens
                    assert allowed == (seq_start <= k <= q), (row, q, k)
    assert mb["teacher_attention_mask"].shape[-1] == 32


# ------------------------------------------------------------------------------- against float64 HF


def _packed_log_probs(rank, world_size, hf_dir, tp):
    from megatron_sdpg.models.architecture import model_config_from_hf, read_hf_config
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import collate
    from megatron_sdpg.train.step import PolicyModel
    from megatron_sdpg.formats.hf_io import SafetensorsReader
    from megatron_sdpg.weights.load import load_hf_weights_into

    groups = init_model_parallel(ParallelConfig(tp=tp), seed=1)
    cfg = model_config_from_hf(read_hf_config(hf_dir), hf_dir)
    model = PolicyModel(cfg, groups, None,
                        weights_loader=lambda c: load_hf_weights_into(c, cfg, groups, SafetensorsReader(hf_dir)))
    samples = _samples()
    pad = lambda n: -(-n // 8) * 8  # noqa: E731
    mbs = [collate(chunk, 0, pad(max(x.student_length for x in chunk)), pad(max(x.teacher_length for x in chunk)),
                   pack=True) for chunk in (samples[:6], samples[6:])]  # samples in order: row order is packing's
    rows = [(mb["tokens"].shape[0], mb["num_sequences"]) for mb in mbs]

    def stash(mb, logits):
        mb["_source"]["teacher"] = mb["teacher_logits"] / TEMPERATURE
        mb["_source"]["student"] = passes.response_logits(logits, mb).detach() / TEMPERATURE
        return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {}

    model.forward_only([dict(mb, inline_teacher=True, _source=mb) for mb in mbs], stash)
    return {"rows": rows, "teacher": torch.cat([mb["teacher"] for mb in mbs]),
            "student": torch.cat([mb["student"] for mb in mbs])}


def _hf_log_probs(hf_dir):
    """Per sample, in sample order: the float64 log-softmax at temperature 0.7 of each response position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    teacher, student = [], []
    with torch.no_grad():
        for s in _samples():
            for prompt, out in ((s.teacher_prompt_ids, teacher), (s.prompt_ids, student)):
                logits = model(torch.tensor([prompt + s.response_ids])).logits[0]
                out.append((logits[len(prompt) - 1:len(prompt) - 1 + len(s.response_ids)] / TEMPERATURE)
                           .log_softmax(-1))
    return teacher, student


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_views_match_float64_hf(tmp_path, tp):
    from megatron_sdpg.testing.tiny_hf import tiny_hf_model

    hf_dir = os.path.join(tmp_path, "hf")
    model = tiny_hf_model("llama_gqa_rope3")
    model.save_pretrained(hf_dir)
    vocab = model.config.vocab_size
    ranks = run_on_ranks(_packed_log_probs, tp, hf_dir, tp, timeout=240)
    assert any(r < n for r, n in ranks[0]["rows"]), f"nothing was packed: {ranks[0]['rows']}"
    hf_teacher, hf_student = _hf_log_probs(hf_dir)
    for view, hf in (("teacher", hf_teacher), ("student", hf_student)):
        got = torch.cat([r[view] for r in ranks], dim=-1)[:, :vocab].double().log_softmax(-1)  # TP shards, in order
        torch.testing.assert_close(got, torch.cat(hf), rtol=0, atol=1e-5, msg=lambda m: f"{view} TP{tp}: {m}")
    # The privileged context must matter, or the test would not tell the views apart.
    assert (torch.cat(hf_teacher) - torch.cat(hf_student)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------ two SDPG steps


def _two_steps(groups, pack: bool, dtype: str, fused: bool):
    from functools import partial

    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.models.architecture import ModelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    def tiny():
        return ModelConfig(arch="qwen3", vocab_size=101, hidden_size=64, num_attention_heads=4,
                           num_key_value_heads=2, num_layers=2, params_dtype=dtype)

    cfg = SDPGConfig()
    cfg.algorithm = apply_preset("sdpg", beta_base=0.5, beta_warmup_steps=0, beta_decay_steps=0, alpha=0.05,
                                 temperature=TEMPERATURE, ref_kl_mode="k3", fused_output=fused)
    policy = PolicyModel(tiny(), groups, OptimizerConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.1),
                         use_distributed_optimizer=True, total_steps=2, seed=3)
    reference = PolicyModel(tiny(), groups, None, seed=3)
    history, packed_rows = [], []
    for step in range(2):
        mbs = plan_microbatches(_samples(vocab=101), groups.layout.dp, groups.dp_rank, 4, 0, 0, with_teacher=True,
                                one_shape=False, sort_by_length=not pack, pack=pack)
        packed_rows += [mb["tokens"].shape[0] < mb["num_sequences"] for mb in mbs]
        passes.log_prob_pass(reference, mbs, "ref_log_probs", TEMPERATURE)
        for mb in mbs:
            mb["inline_teacher"], mb["emit_hidden"] = True, fused
        result = policy.train_step(mbs, partial(sdpg_loss_fn, cfg, groups, step), teacher=policy)
        assert result.updated
        m = result.metrics
        history.append((m["loss"], result.grad_norm, m["distill_kl"], m["ref_kl"], m["entropy"]))
    return history, any(packed_rows)


def _both(rank, world_size, tp, dtype, fused):
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig

    groups = init_model_parallel(ParallelConfig(tp=tp, use_distributed_optimizer=True), seed=7)
    return _two_steps(groups, False, dtype, fused), _two_steps(groups, True, dtype, fused)


LAYOUTS = {"single": (1, 1, "float32", False), "single_fused_output": (1, 1, "float32", True),
           "tp2": (2, 2, "float32", False), "dp2": (1, 2, "float32", False), "single_bf16": (1, 1, "bfloat16", False)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_steps_equal_padded_steps(name):
    tp, world, dtype, fused = LAYOUTS[name]
    for rank, ((padded, _), (packed, any_packed)) in enumerate(run_on_ranks(_both, world, tp, dtype, fused,
                                                                             timeout=300)):
        assert any_packed, f"{name} rank {rank}: no micro-batch was packed"
        ref = torch.tensor(padded, dtype=torch.float64)
        assert (ref[:, 2] > 0).all() and (ref[-1, 3] > 0), "the KL terms must be live"
        got = torch.tensor(packed, dtype=torch.float64)
        if dtype == "bfloat16":  # rounding of bf16 activations differs with the layout: the first step, loosely
            torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=1e-3, msg=lambda m: f"{name}: {m}")
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"{name} rank {rank} (loss, grad norm, KL, ref KL, H): {m}")
