"""From rollout samples to padded micro-batches with aligned response spans.

A sample has a student prompt, a teacher prompt (the same user message plus
the privileged context) and one response. The student sequence is
``prompt + response`` and the teacher sequence ``teacher_prompt + response``:
the response tokens are identical, their positions differ. For every
micro-batch we keep, for both sequences, the flat row indices of the logits
that predict each response token, so both views yield ``[T, V/tp]`` logits over
the same ``T`` response tokens in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sdpg.data.packing import balance_partitions, split_microbatches


@dataclass
class TrainSample:
    """One response to one prompt, with everything the losses need.

    Attributes:
        group: Index of the prompt (a group holds the ``n`` responses to it).
        prompt_ids: Student prompt tokens.
        teacher_prompt_ids: Teacher prompt tokens (privileged context included).
        response_ids: Sampled response tokens (EOS included when generated).
        rollout_log_probs: The engine's log-prob of each response token.
        reward: Verifier reward.
        advantage: Group-relative advantage (filled in after verification).
        finish_reason: ``stop`` or ``length``.
    """

    group: int
    prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    rollout_log_probs: list[float]
    reward: float = 0.0
    advantage: float = 0.0
    finish_reason: str = "stop"

    @property
    def student_length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def teacher_length(self) -> int:
        return len(self.teacher_prompt_ids) + len(self.response_ids)


def _collate_view(prompts: list[list[int]], responses: list[list[int]], pad_id: int, pad_to: int, rows: int):
    """Right-padded tokens ``[rows, s]`` and the flat logit rows predicting each response token.

    Rows past ``len(prompts)`` are all padding (no response tokens): pipeline
    parallelism needs every micro-batch of a call to have one shape.
    """
    b = max(rows, len(prompts))
    tokens = torch.full((b, pad_to), pad_id, dtype=torch.long)
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r
        if len(seq) > pad_to:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit the padded length {pad_to}")
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        start = i * pad_to + len(p) - 1  # the logit at position t predicts token t + 1
        rows.append(torch.arange(start, start + len(r), dtype=torch.long))
    resp_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    positions = torch.arange(pad_to, dtype=torch.long).expand(b, pad_to).contiguous()
    return tokens, positions, resp_rows


def collate(samples: list[TrainSample], pad_id: int, student_len: int, teacher_len: int | None,
            rows: int = 0) -> dict:
    """One micro-batch, padded to at least ``rows`` sequences.

    Returns:
        A dict with ``tokens``/``position_ids`` ``[b, student_len]``,
        ``resp_rows`` ``[T]`` (flat rows of ``[b*student_len]`` logits),
        per-token ``target``, ``advantages``, ``rollout_log_probs``, ``seq_index``
        (``[T]``), per-sequence ``rewards`` ``[b]``, and with ``teacher_len`` the
        teacher view ``teacher_tokens``/``teacher_position_ids``/``teacher_resp_rows``.
    """
    prompts = [s.prompt_ids for s in samples]
    responses = [s.response_ids for s in samples]
    tokens, positions, resp_rows = _collate_view(prompts, responses, pad_id, student_len, rows)
    lengths = [len(r) for r in responses]
    mb = dict(
        tokens=tokens,
        position_ids=positions,
        resp_rows=resp_rows,
        target=torch.tensor([t for r in responses for t in r], dtype=torch.long),
        advantages=torch.tensor([s.advantage for s, n in zip(samples, lengths) for _ in range(n)], dtype=torch.float32),
        rollout_log_probs=torch.tensor([lp for s in samples for lp in s.rollout_log_probs], dtype=torch.float32),
        seq_index=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths, dtype=torch.long)),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        num_sequences=len(samples),
    )
    if teacher_len is not None:
        t_tokens, t_positions, t_rows = _collate_view([s.teacher_prompt_ids for s in samples], responses, pad_id,
                                                      teacher_len, rows)
        mb.update(teacher_tokens=t_tokens, teacher_position_ids=t_positions, teacher_resp_rows=t_rows)
    return mb


def plan_microbatches(samples: list[TrainSample], dp: int, dp_rank: int, micro_batch_size: int, max_tokens: int,
                      pad_id: int, with_teacher: bool, pad_multiple: int = 8, one_shape: bool = True,
                      sort_by_length: bool = False) -> list[dict]:
    """This DP rank's micro-batches of a global batch, balanced by tokens across DP.

    With ``one_shape`` (pipeline parallelism needs it: its p2p buffers have one
    shape per call) all micro-batches of the call share one shape: as many rows
    as the largest micro-batch, and as many tokens as the longest sequence of the
    whole global batch rounded up to ``pad_multiple``, separately for the student
    and teacher views. Without it each micro-batch is padded to its own longest
    sequence (rounded up to ``pad_multiple``) and holds only its own rows.
    ``sort_by_length`` buckets by length: this rank's sequences go into
    micro-batches in increasing padded length (ties by index), so sequences of
    like length share one. It changes which sequences share a micro-batch, hence
    a mini-batch: the loss of a step with one update is the same. (Padding-free
    THD packing needs megatron's ``PackedSeqParams``, which only the Transformer
    Engine attention takes; the local spec that runs on CPU refuses it.)

    The split is deterministic, so every rank of a DP replica (its TP and PP
    peers) computes the same micro-batches.

    Returns:
        A list of micro-batch dicts (see :func:`collate`), possibly empty when
        this rank gets no sample.
    """
    lengths = [s.student_length for s in samples]
    parts = balance_partitions(lengths, dp)
    mine = parts[dp_rank]

    def _pad(n: int) -> int:
        return -(-n // pad_multiple) * pad_multiple

    def _padded_len(s: TrainSample) -> int:
        return max(_pad(s.student_length), _pad(s.teacher_length) if with_teacher else 0)

    if sort_by_length:
        mine = sorted(mine, key=lambda i: (_padded_len(samples[i]), i))
    if not one_shape:
        groups = split_microbatches(mine, [_padded_len(s) for s in samples], micro_batch_size, max_tokens)
        out = []
        for g in groups:
            chosen = [samples[i] for i in g]
            teacher_len = _pad(max(s.teacher_length for s in chosen)) if with_teacher else None
            out.append(collate(chosen, pad_id, _pad(max(s.student_length for s in chosen)), teacher_len))
        return out
    student_len = _pad(max(lengths))
    teacher_len = _pad(max(s.teacher_length for s in samples)) if with_teacher else None
    budget_len = max(student_len, teacher_len or 0)
    cost = [budget_len] * len(samples)  # everything is padded to the same length
    groups = split_microbatches(mine, cost, micro_batch_size, max_tokens)
    rows = max((len(g) for g in groups), default=0)
    return [collate([samples[i] for i in g], pad_id, student_len, teacher_len, rows) for g in groups]
