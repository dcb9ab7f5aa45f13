"""The teacher's log-probs are the same through PP2 (pre-pass and inside the schedule), PP1 (inline) and HF.

A tiny Llama (GQA, Llama-3 RoPE scaling) is loaded from HF safetensors into
Megatron at PP1 and at PP2. For a batch of samples whose teacher prompts are
longer than their student prompts, the teacher's log-softmax over the response
positions must match (1) between the two layouts and (2) a float64
``transformers`` forward of ``teacher_prompt + response`` (tolerance 1e-5 abs on
log-probs, fp32 model). The student view is checked against HF the same way; at PP2
the teacher view inside the student's schedule (both views through both stages,
sent on concatenated) must give the student's and the teacher's log-probs too.
"""

import os

import torch

from megatron_sdpg.testing.distributed import run_on_ranks


def _samples():
    from megatron_sdpg.train.batch import TrainSample

    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(6):
        p = torch.randint(3, 128, (3 + i % 3,), generator=gen).tolist()
        ctx = torch.randint(3, 128, (4 + i % 2,), generator=gen).tolist()
        r = torch.randint(3, 128, (2 + i % 4,), generator=gen).tolist()
        out.append(TrainSample(group=i // 2, prompt_ids=p, teacher_prompt_ids=p[:1] + ctx + p[1:], response_ids=r,
                               rollout_log_probs=[0.0] * len(r)))
    return out


def _log_softmax_full(shards: list[torch.Tensor], vocab: int) -> torch.Tensor:
    return torch.cat(shards, dim=-1)[..., :vocab].double().log_softmax(-1)


def _teacher_logits(rank, world_size, hf_dir, pp):
    from megatron_sdpg.models.architecture import model_config_from_hf, read_hf_config
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.step import PolicyModel
    from megatron_sdpg.formats.hf_io import SafetensorsReader
    from megatron_sdpg.weights.load import load_hf_weights_into

    groups = init_model_parallel(ParallelConfig(pp=pp), seed=1)
    cfg = model_config_from_hf(read_hf_config(hf_dir), hf_dir)
    model = PolicyModel(cfg, groups, None,
                        weights_loader=lambda c: load_hf_weights_into(c, cfg, groups, SafetensorsReader(hf_dir)))
    mbs = plan_microbatches(_samples(), 1, 0, micro_batch_size=4, max_tokens=0, pad_id=0, with_teacher=True)
    out = {}

    def stash(mb, logits):
        mb["_source"]["teacher_logits"] = mb["teacher_logits"]
        mb["_source"]["student_logits"] = passes.response_logits(logits, mb).detach()
        return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {}

    model.forward_only([dict(mb, inline_teacher=True, _source=mb) for mb in mbs], stash)
    if groups.is_last_stage:
        out["inline"] = [(mb.pop("teacher_logits"), mb.pop("student_logits")) for mb in mbs]
    if pp > 1:
        passes.teacher_pass(model, mbs)
        if groups.is_last_stage:
            out["prepass"] = [(mb["teacher_logits"], None) for mb in mbs]
    return out if groups.is_last_stage else None


def _hf_response_log_probs(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    teacher, student = [], []
    with torch.no_grad():
        for s in _samples():
            for prompt, out in ((s.teacher_prompt_ids, teacher), (s.prompt_ids, student)):
                ids = torch.tensor([prompt + s.response_ids])
                logits = model(ids).logits[0]
                out.append(logits[len(prompt) - 1:len(prompt) - 1 + len(s.response_ids)].log_softmax(-1))
    return torch.cat(teacher), torch.cat(student)


def test_teacher_through_pp2_equals_pp1_inline_and_hf(tmp_path):
    from megatron_sdpg.testing.tiny_hf import tiny_hf_model

    hf_dir = os.path.join(tmp_path, "hf")
    model = tiny_hf_model("llama_gqa_rope3")
    model.save_pretrained(hf_dir)
    vocab = model.config.vocab_size

    pp1 = run_on_ranks(_teacher_logits, 1, hf_dir, 1, timeout=180)[0]["inline"]
    pp2 = [r for r in run_on_ranks(_teacher_logits, 2, hf_dir, 2, timeout=180) if r is not None][0]
    hf_teacher, hf_student = _hf_response_log_probs(hf_dir)

    t_pp1 = torch.cat([_log_softmax_full([t], vocab) for t, _ in pp1])
    s_pp1 = torch.cat([_log_softmax_full([s], vocab) for _, s in pp1])
    assert t_pp1.shape == hf_teacher.shape
    for name in ("prepass", "inline"):
        t_pp2 = torch.cat([_log_softmax_full([t], vocab) for t, _ in pp2[name]])
        torch.testing.assert_close(t_pp2, t_pp1, rtol=0, atol=1e-5, msg=lambda m: f"PP2 {name}: {m}")
    s_pp2 = torch.cat([_log_softmax_full([s], vocab) for _, s in pp2["inline"]])
    torch.testing.assert_close(s_pp2, hf_student, rtol=0, atol=1e-5)
    torch.testing.assert_close(t_pp1, hf_teacher, rtol=0, atol=1e-5)
    torch.testing.assert_close(s_pp1, hf_student, rtol=0, atol=1e-5)
    # The privileged context must matter, or the test would not tell the views apart.
    assert (t_pp1 - s_pp1).abs().max() > 1e-2
