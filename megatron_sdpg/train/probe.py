"""The post-sync log-prob probe: the trainer's log-probs of a fixed token sequence.

After every weight sync the engines score the same sequence
(``/generate`` with prompt log-probs) and
:meth:`~megatron_sdpg.rollout.sync.base.WeightSync.check_probe` compares them
with the trainer's (``rollout.post_sync_check_threshold``; NaN/inf fails). The
trainer's side is one forward of one short sequence through the Megatron
pipeline, a collective over all ranks; usable by any launcher (torchrun, Slurm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.rollout.sync.base import ProbeCheck

PROBE_LENGTH = 16


def probe_token_ids(vocab_size: int, length: int = PROBE_LENGTH, seed: int = 20240917) -> list[int]:
    """A fixed pseudo-random sequence of ``length`` token ids below ``vocab_size``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def trainer_probe_logprobs(policy, groups: ParallelGroups, token_ids: list[int], pad_id: int) -> list[float]:
    """The trainer's log-probs of ``token_ids[1:]`` given their prefixes (raw logits, fp32): ``[p-1]``.

    A collective: every rank joins (each data-parallel replica runs the same
    forward); every rank gets the values of the last pipeline stage of replica 0.
    """
    from megatron_sdpg.train.batch import TrainSample, collate
    from megatron_sdpg.train.passes import log_prob_pass

    p = len(token_ids)
    sample = TrainSample(group=0, prompt_ids=token_ids[:1], teacher_prompt_ids=token_ids[:1],
                         response_ids=list(token_ids[1:]), rollout_log_probs=[0.0] * (p - 1))
    mb = collate([sample], pad_id, -(-p // 8) * 8, None)
    log_prob_pass(policy, [mb], "probe_log_probs", 1.0)
    owner = groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0 and groups.cp_rank == 0
    mine = [float(x) for x in mb["probe_log_probs"].tolist()] if owner else None
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)  # any backend
    return next(v for v in gathered if v is not None)


def build_probe(policy, groups: ParallelGroups, vocab_size: int, pad_id: int, threshold: float | None) -> ProbeCheck | None:
    """The :class:`ProbeCheck` of the current weights (every rank joins; None when the check is off)."""
    if threshold is None:
        return None
    ids = probe_token_ids(vocab_size)
    return ProbeCheck(ids, trainer_probe_logprobs(policy, groups, ids, pad_id), threshold)
