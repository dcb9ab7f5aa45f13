"""Logits only at response rows vs every position: one DP rank's SDPG step, alternated in one process.

``old`` runs the output layer at every position with every micro-batch padded to one shape;
``new`` is the trainer's path (response rows only, micro-batches bucketed by length). 64 samples
(one DP2 rank of 16 prompts x 8), compact prompts of 11 tokens, teacher prompts of 25, responses
of 12-24 tokens (the embedded default's responses average 22.5), micro-batch 32.
Wall and process CPU time (OMP 1 thread: CPU time is the work, less sensitive to shared cores);
medians over the repetitions after a warm-up one.

Usage::

    python benchmarks/bench_response_rows.py [--reps 6] [--vocab V]   # V: the tiny body with a larger vocabulary
"""

from __future__ import annotations

import argparse
import os
import statistics as st
import sys
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def body(rank, world, reps, vocab):
    from megatron_sdpg.algo.config import apply_preset
    from megatron_sdpg.config.schema import SDPGConfig
    from megatron_sdpg.models.architecture import model_config_from_hf, read_hf_config
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.train import passes
    from megatron_sdpg.train.batch import TrainSample, plan_microbatches
    from megatron_sdpg.train.setup import sdpg_loss_fn
    from megatron_sdpg.train.step import OptimizerConfig, PolicyModel

    torch.set_num_threads(1)
    hf = os.path.join(ROOT, "artifacts", "tiny_model")
    groups = init_model_parallel(ParallelConfig(), seed=1)
    mcfg = model_config_from_hf(read_hf_config(hf), hf)
    if vocab:
        import dataclasses

        mcfg = dataclasses.replace(mcfg, vocab_size=vocab)
    cfg = SDPGConfig()
    cfg.algorithm = apply_preset("sdpg", beta_base=0.1, beta_warmup_steps=0, beta_decay_steps=0, alpha=1e-3)
    policy = PolicyModel(mcfg, groups, OptimizerConfig(lr=3e-5, lr_warmup_steps=0), total_steps=100, seed=1)
    reference = PolicyModel(mcfg, groups, None, seed=1)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(64):
        p = torch.randint(3, 190, (11,), generator=g).tolist()
        r = torch.randint(3, 190, (int(torch.randint(12, 25, (1,), generator=g)),), generator=g).tolist()
        samples.append(TrainSample(group=i // 8, prompt_ids=p, teacher_prompt_ids=p[:2] + [5] * 14 + p[2:],
                                   response_ids=r, rollout_log_probs=[-1.0] * len(r), advantage=(i % 3) - 1.0))
    res = {"old": [], "new": []}
    for rep in range(reps):
        for name in ("old", "new"):
            new = name == "new"
            policy.select_response_rows = reference.select_response_rows = new
            mbs = plan_microbatches(samples, 1, 0, 32, 0, 0, with_teacher=True, one_shape=not new, sort_by_length=new)
            t = {}
            w0, c0 = time.perf_counter(), time.process_time()
            passes.log_prob_pass(reference, mbs, "ref_log_probs", 1.0)
            w1, c1 = time.perf_counter(), time.process_time()
            for mb in mbs:
                mb["inline_teacher"] = True
            policy.train_step(mbs, partial(sdpg_loss_fn, cfg, groups, 0))
            w2, c2 = time.perf_counter(), time.process_time()
            if rep:  # rep 0 is warm-up
                res[name].append((w1 - w0, c1 - c0, w2 - w1, c2 - c1))
    return {k: [st.median(x[i] for x in v) for i in range(4)] for k, v in res.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=0, help="replace the tiny model's vocabulary size (0: keep)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from megatron_sdpg.testing.distributed import run_on_ranks

    out = run_on_ranks(body, 1, args.reps, args.vocab, timeout=3600)[0]
    for k, (rw, rc, uw, uc) in out.items():
        print(f"{k}: reference pass {rw:.3f} s wall / {rc:.3f} s cpu; update (teacher inline + fwd + bwd + opt) "
              f"{uw:.3f} s wall / {uc:.3f} s cpu")


if __name__ == "__main__":
    main()
