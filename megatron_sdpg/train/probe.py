"""The trainer's side of the post-sync log-prob check (``rollout.post_sync_check_threshold``).

After each weight sync every engine scores a fixed probe sequence
(``/generate`` with prompt log-probs) and the answers must match the trainer's
own log-probs of it under the weights just exported
(:class:`~megatron_sdpg.rollout.sync.base.ProbeCheck`). This module computes the
trainer's numbers with one forward-only pass of the policy on every rank (the
pipeline and tensor-parallel collectives need them all); the last pipeline stage
of data-parallel replica 0, TP rank 0, contributes the values and a global sum
brings them to rank 0.

A minimal wiring for the cluster path (issue 15); the probe sequence is fixed and
independent of the tokenizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sdpg.train.batch import TrainSample, collate
from megatron_sdpg.train.passes import log_prob_pass

PROBE_LENGTH = 16


def probe_tokens(vocab_size: int, length: int = PROBE_LENGTH) -> list[int]:
    """A fixed probe: ``length`` token ids spread over ``[1, vocab_size)``."""
    return [1 + (7919 * i + 13) % (vocab_size - 1) for i in range(length)]


def trainer_probe_logprobs(model, tokens: list[int], pad_id: int) -> list[float] | None:
    """Log-probs ``[p-1]`` of ``tokens[1:]`` under ``model`` at temperature 1 (raw logits, fp32).

    Runs a forward-only pass on every rank of ``model.groups``; returns the values on
    global rank 0 and ``None`` elsewhere.
    """
    groups = model.groups
    sample = TrainSample(group=0, prompt_ids=tokens[:1], teacher_prompt_ids=tokens[:1], response_ids=tokens[1:],
                         rollout_log_probs=[0.0] * (len(tokens) - 1))
    pad_to = -(-len(tokens) // 8) * 8
    mb = collate([sample], pad_id, pad_to, None)
    log_prob_pass(model, [mb], "probe_log_probs", 1.0)
    out = torch.zeros(len(tokens) - 1, dtype=torch.float64)
    if groups.is_last_stage and groups.dp_rank == 0 and groups.tp_rank == 0 and groups.cp_rank == 0:
        out += mb["probe_log_probs"].detach().to("cpu", torch.float64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out)  # one rank contributes: the sum is its values
    return out.cpu().tolist() if dist.get_rank() == 0 else None


def post_sync_probe(parts) -> object | None:
    """The :class:`ProbeCheck` for the weights being synced (rank 0), or ``None``.

    ``None`` everywhere when ``rollout.post_sync_check_threshold`` is null. Every rank
    must call it (collectives).
    """
    from megatron_sdpg.rollout.sync.base import ProbeCheck

    threshold = parts.cfg.rollout.post_sync_check_threshold
    if threshold is None:
        return None
    tokens = probe_tokens(parts.model_cfg.vocab_size)
    logprobs = trainer_probe_logprobs(parts.policy, tokens, parts.pad_id)
    if dist.get_rank() != 0:
        return None
    return ProbeCheck(tokens, logprobs, threshold)

