"""Packed micro-batch rows vs one padded row per sequence: one DP rank's step, alternated in one process.

``padded`` is the trainer's path before ``train.pack_sequences`` (micro-batches bucketed by
length, each padded to its own longest sequence, rounded up to 8); ``packed`` the default now
(several sequences per row of the micro-batch's padded longest sequence, block-diagonal causal
mask). Both compute logits at the response rows only. 64 samples (one DP2 rank of 16 prompts x 8),
prompts of 11 tokens (teacher: 23), responses of ``min(48, 6 + Exp(mean 17))`` tokens (mean ~22,
as the embedded default's), micro-batch 32, the tiny model (``--model-dir``, default ``artifacts/tiny_model``), one thread.
Per repetition a new batch; both paths take the same batch, alternated; medians after a warm-up
repetition. Wall and process CPU seconds of the reference pass plus the update (teacher inline
for ``sdpg``).

Usage::

    python benchmarks/bench_packed_rows.py [--reps 8] [--presets grpo sdpg]

One JSON line per preset: ``padded_s``, ``packed_s`` (wall), ``padded_cpu_s``, ``packed_cpu_s``,
``speedup`` (padded / packed wall), ``tokens`` (real), ``padded_tokens``, ``packed_tokens``
(positions computed per step), ``loss_max_abs_diff`` (the two paths' losses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples(seed: int, vocab: int):
    from megatron_sdpg.train.batch import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(64):
        r_len = int(min(48, 6 + torch.empty(1).exponential_(1 / 17.0, generator=g).item()))
        prompt = torch.randint(3, vocab, (11,), generator=g).tolist()
        out.append(TrainSample(group=i // 8, prompt_ids=prompt, teacher_prompt_ids=prompt[:2] + [5] * 12 + prompt[2:],
                               response_ids=torch.randint(3, vocab, (r_len,), generator=g).tolist(),
                               rollout_log_probs=(-torch.rand(r_len, generator=g) * 4 - 0.5).tolist(),
                               advantage=float(torch.randn(1, generator=g))))
    return out


def body(rank, world, model_dir, reps, preset):
    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.models.architecture import model_config_from_hf, read_hf_config
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    torch.set_num_threads(1)
    hf = model_dir
    groups = init_model_parallel(ParallelConfig(), seed=1)
    mcfg = model_config_from_hf(read_hf_config(hf), hf)
    cfg = SDPGConfig()
    teacher = preset != "grpo"
    cfg.algorithm = apply_preset(preset, beta_base=0.1 if teacher else 0.0, beta_warmup_steps=0, beta_decay_steps=0,
                                 alpha=1e-3, ref_kl_mode="k3")
    # lr ~0: the weights stay put, so every repetition's two paths see the same model
    policy = PolicyModel(mcfg, groups, OptimizerConfig(lr=1e-12, lr_warmup_steps=0), total_steps=100, seed=1)
    reference = PolicyModel(mcfg, groups, None, seed=1)
    res = {"padded": [], "packed": []}
    tokens, positions, losses = 0, {}, {}
    for rep in range(reps + 1):
        samples = _samples(rep, mcfg.vocab_size)
        for name in ("padded", "packed"):
            pack = name == "packed"
            mbs = plan_microbatches(samples, 1, 0, 32, 0, 0, with_teacher=teacher, one_shape=False,
                                    sort_by_length=not pack, pack=pack)
            w0, c0 = time.perf_counter(), time.process_time()
            passes.log_prob_pass(reference, mbs, "ref_log_probs", 1.0)
            for mb in mbs:
                mb["inline_teacher"], mb["emit_hidden"] = teacher, False
            result = policy.train_step(mbs, partial(sdpg_loss_fn, cfg, groups, 0), teacher=policy if teacher else None)
            w1, c1 = time.perf_counter(), time.process_time()
            if rep:  # rep 0 is warm-up
                res[name].append((w1 - w0, c1 - c0))
                positions.setdefault(name, []).append(sum(mb["tokens"].numel() for mb in mbs))
                losses.setdefault(rep, []).append(result.metrics["loss"])
        if rep:
            tokens += sum(s.student_length for s in samples)
    med = {k: (st.median(w for w, _ in v), st.median(c for _, c in v)) for k, v in res.items()}
    return {"preset": preset, "padded_s": med["padded"][0], "packed_s": med["packed"][0],
            "padded_cpu_s": med["padded"][1], "packed_cpu_s": med["packed"][1],
            "speedup": med["padded"][0] / med["packed"][0], "tokens": tokens / reps,
            "padded_tokens": st.mean(positions["padded"]), "packed_tokens": st.mean(positions["packed"]),
            "loss_max_abs_diff": max(abs(a - b) for a, b in losses.values()), "reps": reps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.path.join(ROOT, "artifacts", "tiny_model"))
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--presets", nargs="+", default=["grpo", "sdpg"], choices=["grpo", "sdpg"])
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.exit(2, f"error: --reps: must be >= 1, got {args.reps}\n")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.exit(2, f"error: --model-dir: no model in {args.model_dir} (build one with tools/make_tiny_model.py)\n")
    sys.path.insert(0, ROOT)
    from megatron_sdpg.testing.distributed import run_on_ranks

    for preset in args.presets:
        print(json.dumps(run_on_ranks(body, 1, args.model_dir, args.reps, preset, timeout=3600)[0]), flush=True)


if __name__ == "__main__":
    main()
