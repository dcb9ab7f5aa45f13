"""Rollout phase of a step (logging rank only): generate, verify, advantages.

Also the held-out evaluation through the same engines (greedy, with and
without the privileged context), since the engines hold the synced weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from megatron_sdpg.data.problem import Problem
from megatron_sdpg.train.batch import TrainSample
from megatron_sdpg.train.overlap import weight_version_number


@dataclass
class RolloutContext:
    """What the rollout phase talks to (all on the logging rank)."""

    client: object  # megatron_sdpg.rollout.blocking_client.RolloutClient
    builder: object  # megatron_sdpg.data.prompts.PromptBuilder
    verifier: object  # megatron_sdpg.rewards.pool.VerifierPool
    tokenizer: object
    sampling: object  # megatron_sdpg.rollout.config.SamplingConfig
    n_samples: int


def _texts(tokenizer, outputs) -> list[str]:
    return [o.text if o.text is not None else tokenizer.decode(o.output_ids, skip_special_tokens=True)
            for o in outputs]


def collect_rollouts(ctx: RolloutContext, problems: list[Problem], seed: int, algo) -> tuple[list[TrainSample], dict]:
    """Generates ``n`` responses per problem, scores them, computes advantages.

    Args:
        ctx: Engines, prompt builder, verifier.
        problems: This step's prompts.
        seed: Sampling seed of this step.
        algo: The ``AlgorithmConfig`` (advantage estimator switches, dynamic sampling).

    Returns:
        ``(samples, metrics)``; with dynamic sampling, groups whose rewards are
        all equal are dropped (``rollout/dropped_groups`` counts them).
        ``rollout/weight_version``: the engines' weight version the samples were
        generated with (the oldest, when they differ; absent if not reported).
    """
    import torch

    from megatron_sdpg.algo.advantages import group_advantages, overlong_penalty

    student = [ctx.builder.student_ids(p) for p in problems]
    truncated_before = ctx.builder.truncations
    teacher = [ctx.builder.teacher_ids(p) for p in problems]
    groups, metrics = ctx.client.generate(student, n=ctx.n_samples, sampling=ctx.sampling, seed=seed)
    metrics["data/teacher_context_truncated"] = float(ctx.builder.truncations - truncated_before)
    flat = [o for g in groups for o in g]
    version = weight_version_number([o.weight_version for o in flat])
    if version is not None:  # the weights that generated the batch (the trainer adds rollout/staleness)
        metrics["rollout/weight_version"] = float(version)
    answers = [problems[o.group].answer for o in flat]
    t0 = time.perf_counter()
    scored = ctx.verifier.score(_texts(ctx.tokenizer, flat), answers)
    metrics["time/verify_s"] = time.perf_counter() - t0
    metrics.update(scored.metrics())
    flat_rewards = torch.tensor(scored.rewards, dtype=torch.float32)  # reward.* values; failures included
    if algo.overlong_buffer:
        lengths = torch.tensor([len(o.output_ids) for o in flat])
        flat_rewards = flat_rewards + overlong_penalty(lengths, ctx.sampling.max_new_tokens, algo.overlong_buffer,
                                                       algo.overlong_penalty)
    advantages = group_advantages(flat_rewards, ctx.n_samples, algo.normalize_adv_std, algo.eps_std)
    advantages = advantages.view(len(problems), ctx.n_samples)
    rewards = flat_rewards.view(len(problems), ctx.n_samples)
    samples = []
    dropped = 0
    for g in range(len(problems)):
        if algo.dynamic_sampling and bool((rewards[g] == rewards[g, 0]).all()):
            dropped += 1
            continue
        for k, out in enumerate(groups[g]):
            samples.append(TrainSample(
                group=g,
                prompt_ids=student[g],
                teacher_prompt_ids=teacher[g],
                response_ids=list(out.output_ids),
                rollout_log_probs=list(out.logprobs),
                reward=float(rewards[g, k]),
                advantage=float(advantages[g, k]),
                finish_reason=out.finish_reason,
            ))
    lengths = [len(s.response_ids) for s in samples] or [0]
    metrics.update({
        "rollout/dropped_groups": float(dropped),
        "response_length": sum(lengths) / len(lengths),
        "response_length_max": float(max(lengths)),
        "reward": float(rewards.mean()),
        "accuracy": sum(scored.correct) / max(len(scored.correct), 1),
    })
    return samples, metrics


def evaluate_through_engine(ctx: RolloutContext, problems: list[Problem], with_context: bool,
                            max_new_tokens: int) -> float:
    """Greedy held-out accuracy of the engines' current weights.

    Args:
        with_context: Use the teacher prompt (privileged context) instead of the student one.

    Returns:
        Fraction of problems answered correctly.
    """
    from dataclasses import replace

    prompts = [(ctx.builder.teacher_ids(p) if with_context else ctx.builder.student_ids(p)) for p in problems]
    greedy = replace(ctx.sampling, temperature=0.0, max_new_tokens=max_new_tokens)
    groups, _ = ctx.client.generate(prompts, n=1, sampling=greedy, seed=0)
    outputs = [g[0] for g in groups]
    scored = ctx.verifier.score(_texts(ctx.tokenizer, outputs), [p.answer for p in problems])
    return sum(scored.correct) / max(len(problems), 1)
