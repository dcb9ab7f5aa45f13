"""Supervised warm start on student and teacher prompts, picking a checkpoint in a band.

Each step trains on ``batch_size`` fresh training problems: a ``teacher_fraction`` of
them under the teacher prompt, the rest under the student prompt, with the loss on
the reference response and EOS only (under the teacher prompt the task's
``teacher_reference_response`` where it has one, e.g. ``synthetic-long``'s solution in the
context's order while the student prompt learns another order). Learning is abrupt, so every ``eval_every``
steps the model is evaluated greedily on the *valid* split (never the held-out one)
with and without the privileged context. The kept checkpoint is the one whose
no-context accuracy lies in ``target`` with the highest with-context accuracy (else
the one closest to the band); training stops early once accuracy has passed the band,
or when the process has used ``max_cpu_seconds`` of CPU time (CPU time, not wall time, so
the budget means the same on a machine shared with other jobs).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from megatron_sdpg.data.prompts import PromptBuilder, encode
from megatron_sdpg.eval import evaluate, response_budget
from megatron_sdpg.rewards.pool import VerifierPool

log = logging.getLogger(__name__)


@dataclass
class WarmStartConfig:
    """Warm-start settings (flags of ``tools/make_tiny_model.py``)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 30
    teacher_fraction: float = 0.25
    eval_every: int = 25
    eval_n: int = 200
    target: tuple[float, float] = (0.15, 0.5)
    max_cpu_seconds: float = 300.0
    seed: int = 0


@dataclass
class WarmStartResult:
    """The chosen checkpoint and the evaluation history."""

    state_dict: dict
    step: int
    accuracy: float
    context_accuracy: float
    in_band: bool
    seconds: float
    cpu_seconds: float
    history: list[dict] = field(default_factory=list)


def _batch(tokenizer, prompts: list[list[int]], responses: list[list[int]]):
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` ``[b, s]``; labels only on responses."""
    pad = tokenizer.pad_token_id
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


def _loss_sum(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions, and their count."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((target != -100).sum())


def warm_start_targets(task, batch: list, n_teacher: int) -> list[str]:
    """The reference responses of one warm-start batch, in batch order.

    The first ``n_teacher`` problems are trained under the teacher prompt, on
    ``task.teacher_reference_response`` where the task has one (else
    ``task.reference_response``); the rest under the student prompt, on
    ``task.reference_response``.
    """
    teacher = getattr(task, "teacher_reference_response", task.reference_response)
    return [teacher(p) for p in batch[:n_teacher]] + [task.reference_response(p) for p in batch[n_teacher:]]


def _pick(history: list[dict], target: tuple[float, float]) -> dict:
    lo, hi = target

    def distance(h):
        return max(lo - h["accuracy"], h["accuracy"] - hi, 0.0)

    return min(history, key=lambda h: (distance(h), -h["context_accuracy"], h["step"]))


def warm_start(model, tokenizer, task, builder: PromptBuilder, cfg: WarmStartConfig) -> WarmStartResult:
    """Runs the warm start and returns the chosen checkpoint (the model keeps its last weights).

    Args:
        model: A causal LM (trained in place).
        tokenizer: Its tokenizer.
        task: A generated task with ``reference_response(problem)`` (and optionally
            ``teacher_reference_response(problem)``, the target under the teacher prompt).
        builder: Builds the student / teacher prompts.
        cfg: Steps, batch, learning rate, evaluation cadence, target band.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    problems = task.problems("train", cfg.steps * cfg.batch_size, seed=cfg.seed)
    eos = [tokenizer.eos_token_id]
    max_new_tokens = response_budget(tokenizer, task, problems)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    history: list[dict] = []
    snapshots: dict[int, dict] = {}
    n_teacher = round(cfg.batch_size * cfg.teacher_fraction)
    with VerifierPool(task.default_verifier) as pool:
        for step in range(1, cfg.steps + 1):
            model.train()
            batch = problems[(step - 1) * cfg.batch_size : step * cfg.batch_size]
            responses = [encode(tokenizer, text) + eos for text in warm_start_targets(task, batch, n_teacher)]
            groups = [
                ([builder.teacher_ids(p) for p in batch[:n_teacher]], responses[:n_teacher]),
                ([builder.student_ids(p) for p in batch[n_teacher:]], responses[n_teacher:]),
            ]
            total, count = 0.0, 0
            for g in opt.param_groups:
                g["lr"] = lr_at(step - 1)
            for prompts, resp in groups:
                if prompts:
                    loss, n = _loss_sum(model, *_batch(tokenizer, prompts, resp))
                    loss.backward()
                    total, count = total + loss.item(), count + n
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(max(count, 1))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out_of_time = time.process_time() - cpu_start > cfg.max_cpu_seconds
            if step % cfg.eval_every and step != cfg.steps and not out_of_time:
                continue
            res = evaluate(model, tokenizer, task, cfg.eval_n, with_context=True, builder=builder,
                           pool=pool, split="valid", max_new_tokens=max_new_tokens)
            entry = {"step": step, "loss": total / max(count, 1), "accuracy": res["mean@1"],
                     "context_accuracy": res["context/mean@1"], "seconds": round(time.perf_counter() - start, 1),
                     "cpu_seconds": round(time.process_time() - cpu_start, 1)}
            history.append(entry)
            snapshots[step] = copy.deepcopy(model.state_dict())
            log.info("warm start %s", entry)
            best = _pick(history, cfg.target)
            snapshots = {s: v for s, v in snapshots.items() if s == best["step"] or s == step}
            passed_band = len(history) >= 2 and all(h["accuracy"] > cfg.target[1] for h in history[-2:])
            if out_of_time or passed_band:
                break
    best = _pick(history, cfg.target)
    lo, hi = cfg.target
    return WarmStartResult(
        state_dict=snapshots[best["step"]], step=best["step"], accuracy=best["accuracy"],
        context_accuracy=best["context_accuracy"], in_band=lo <= best["accuracy"] <= hi,
        seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start, history=history,
    )
