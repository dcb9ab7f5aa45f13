"""Balancing and micro-batching: every sequence exactly once, balanced loads, budgets."""

import random

import pytest

from megatron_sdpg.data.packing import balance_partitions, split_microbatches
from megatron_sdpg.train.batch import TrainSample, collate


def test_partitions_cover_every_index_once_and_balance():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    parts = balance_partitions(lengths, 7)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(1000))
    loads = [sum(lengths[i] for i in p) for p in parts]
    # LPT greedy: max load <= mean + the longest item.
    assert max(loads) - sum(loads) / 7 <= max(lengths)


def test_partitions_edge_cases():
    assert balance_partitions([], 3) == [[], [], []]
    assert balance_partitions([5], 2) == [[0], []]
    assert balance_partitions([3, 3, 3, 3], 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError):
        balance_partitions([1], 0)


def test_microbatches_respect_count_and_token_budget():
    lengths = [10, 30, 20, 40, 5]
    batches = split_microbatches(range(5), lengths, max_sequences=2, max_tokens=60)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    for b in batches:
        assert len(b) <= 2
        assert max(lengths[i] for i in b) * len(b) <= 60
    with pytest.raises(ValueError, match="sequence 3 has 40 tokens"):
        split_microbatches(range(5), lengths, max_sequences=2, max_tokens=30)


def test_collate_aligns_student_and_teacher_response_rows():
    samples = [
        TrainSample(group=0, prompt_ids=[1, 2, 3], teacher_prompt_ids=[1, 9, 9, 9, 2, 3], response_ids=[7, 8],
               rollout_log_probs=[-0.1, -0.2], reward=1.0, advantage=0.5),
        TrainSample(group=0, prompt_ids=[1, 2], teacher_prompt_ids=[1, 9, 2], response_ids=[6],
               rollout_log_probs=[-0.3], reward=0.0, advantage=-0.5),
    ]
    mb = collate(samples, pad_id=0, student_len=8, teacher_len=8)
    assert mb["target"].tolist() == [7, 8, 6]
    # Row r of the flat [b*s] logits predicts the token at position r+1 of the same row.
    flat_student = mb["tokens"].reshape(-1)
    flat_teacher = mb["teacher_tokens"].reshape(-1)
    assert flat_student[mb["resp_rows"] + 1].tolist() == [7, 8, 6]
    assert flat_teacher[mb["teacher_resp_rows"] + 1].tolist() == [7, 8, 6]
    assert mb["seq_index"].tolist() == [0, 0, 1]
    assert mb["advantages"].tolist() == [0.5, 0.5, -0.5]
