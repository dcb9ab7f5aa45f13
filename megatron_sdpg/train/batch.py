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


def _collate_view(prompts: list[list[int]], responses: list[list[int]], pad_id: int, pad_to: int, rows: int,
                  pack: bool = False):
    """Right-padded tokens ``[r, s]`` and the flat logit rows predicting each response token.

    Without ``pack`` each sequence has a row of its own; rows past
    ``len(prompts)`` are all padding (no response tokens): pipeline parallelism
    needs every micro-batch of a call to have one shape. With ``pack`` several
    sequences share a row (:func:`pack_rows`) and the view gets an attention
    mask that keeps them apart.

    Returns:
        ``(tokens [r, s], position_ids [r, s], resp_rows [T], attention_mask)``:
        ``resp_rows`` in sequence order, then token order; ``attention_mask`` is
        ``None`` (causal, one sequence a row) or, packed, ``[r, 1, s, s]`` bool,
        True where a position may not attend (megatron's convention): another
        sequence of the row, or a later position.
    """
    placement = pack_rows([len(p) + len(r) for p, r in zip(prompts, responses)], pad_to) if pack else \
        [(i, 0) for i in range(len(prompts))]
    n_rows = max(rows, 1 + max((row for row, _ in placement), default=-1))
    tokens = torch.full((n_rows, pad_to), pad_id, dtype=torch.long)
    if pack:
        positions = torch.zeros((n_rows, pad_to), dtype=torch.long)
        segment = torch.full((n_rows, pad_to), -1, dtype=torch.long)  # which sequence of its row a position holds
    else:
        positions = torch.arange(pad_to, dtype=torch.long).expand(n_rows, pad_to).contiguous()
    spans = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r
        row, offset = placement[i]
        if offset + len(seq) > pad_to:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit the padded length {pad_to}")
        tokens[row, offset: offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
        if pack:
            positions[row, offset: offset + len(seq)] = torch.arange(len(seq))
            segment[row, offset: offset + len(seq)] = i
        start = row * pad_to + offset + len(p) - 1  # the logit at position t predicts token t + 1
        spans.append(torch.arange(start, start + len(r), dtype=torch.long))
    resp_rows = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
    if not pack:
        return tokens, positions, resp_rows, None
    causal = torch.ones((pad_to, pad_to), dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # padding attends to padding: no empty row
    return tokens, positions, resp_rows, ~allowed[:, None]


def pack_rows(lengths: list[int], row_len: int) -> list[tuple[int, int]]:
    """First-fit decreasing placement of sequences into rows of ``row_len`` tokens.

    Args:
        lengths: Token count of each sequence (each at most ``row_len``).
        row_len: Tokens per row.

    Returns:
        ``(row, offset)`` of each sequence, in input order. Deterministic (ties by
        index), so every rank of a replica packs alike.
    """
    free: list[int] = []
    out: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > row_len:
            raise ValueError(f"sequence of {lengths[i]} tokens does not fit the padded length {row_len}")
        row = next((k for k, f in enumerate(free) if f >= lengths[i]), len(free))
        if row == len(free):
            free.append(row_len)
        out[i] = (row, row_len - free[row])
        free[row] -= lengths[i]
    return out


def collate(samples: list[TrainSample], pad_id: int, student_len: int, teacher_len: int | None,
            rows: int = 0, pack: bool = False) -> dict:
    """One micro-batch, padded to at least ``rows`` sequences.

    With ``pack`` the sequences of each view are packed into rows of
    ``student_len`` (``teacher_len``) tokens (:func:`pack_rows`), position ids
    restart at 0 for each sequence, and the view has an ``attention_mask``
    (``teacher_attention_mask``) ``[r, 1, s, s]`` keeping the sequences of a row
    apart; ``b`` below is then the number of rows, not of sequences. Megatron's
    RoPE rotates by the position in the row, so a later sequence of a row is
    rotated by its offset as well: attention scores depend on position
    differences only, so its logits equal its own row's up to float rounding
    (``tests/dist/test_packed_rows.py`` checks them against float64 HF).

    Returns:
        A dict with ``tokens``/``position_ids`` ``[b, student_len]``,
        ``resp_rows`` ``[T]`` (flat rows of ``[b*student_len]`` logits),
        per-token ``target``, ``advantages``, ``rollout_log_probs``, ``seq_index``
        (``[T]``), per-sequence ``rewards`` ``[b]``, and with ``teacher_len`` the
        teacher view ``teacher_tokens``/``teacher_position_ids``/``teacher_resp_rows``.
    """
    prompts = [s.prompt_ids for s in samples]
    responses = [s.response_ids for s in samples]
    tokens, positions, resp_rows, mask = _collate_view(prompts, responses, pad_id, student_len, rows, pack)
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
    if mask is not None:
        mb["attention_mask"] = mask
    if teacher_len is not None:
        t_tokens, t_positions, t_rows, t_mask = _collate_view([s.teacher_prompt_ids for s in samples], responses,
                                                              pad_id, teacher_len, rows, pack)
        mb.update(teacher_tokens=t_tokens, teacher_position_ids=t_positions, teacher_resp_rows=t_rows)
        if t_mask is not None:
            mb["teacher_attention_mask"] = t_mask
    return mb


def plan_microbatches(samples: list[TrainSample], dp: int, dp_rank: int, micro_batch_size: int, max_tokens: int,
                      pad_id: int, with_teacher: bool, pad_multiple: int = 8, one_shape: bool = True,
                      sort_by_length: bool = False, pack: bool = False) -> list[dict]:
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
    ``pack`` (needs ``one_shape`` False, and an attention that honours a given
    mask: megatron's local spec) packs each micro-batch's sequences into rows
    of its padded longest sequence instead (:func:`collate`); buckets by length
    would leave little to pack, so ``sort_by_length`` is then ignored.

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

    if pack and one_shape:
        raise ValueError("packing needs micro-batches of their own shapes (one_shape=False)")
    if sort_by_length and not pack:
        mine = sorted(mine, key=lambda i: (_padded_len(samples[i]), i))
    if not one_shape:
        groups = split_microbatches(mine, [_padded_len(s) for s in samples], micro_batch_size, max_tokens)
        out = []
        for g in groups:
            chosen = [samples[i] for i in g]
            teacher_len = _pad(max(s.teacher_length for s in chosen)) if with_teacher else None
            out.append(collate(chosen, pad_id, _pad(max(s.student_length for s in chosen)), teacher_len, pack=pack))
        return out
    student_len = _pad(max(lengths))
    teacher_len = _pad(max(s.teacher_length for s in samples)) if with_teacher else None
    budget_len = max(student_len, teacher_len or 0)
    cost = [budget_len] * len(samples)  # everything is padded to the same length
    groups = split_microbatches(mine, cost, micro_batch_size, max_tokens)
    rows = max((len(g) for g in groups), default=0)
    return [collate([samples[i] for i in g], pad_id, student_len, teacher_len, rows) for g in groups]
