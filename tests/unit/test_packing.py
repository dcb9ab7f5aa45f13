"""Balancing and micro-batching: every sequence exactly once, balanced loads, budgets, and the
native extension identical to the pure-Python path (and to a literal LPT reference)."""

import heapq
import random
import subprocess
import sys

import pytest

from megatron_sdpg.data import packing
from megatron_sdpg.data.packing import balance_partitions, split_microbatches
from megatron_sdpg.train.batch import TrainSample, collate

needs_native = pytest.mark.skipif(
    not packing.NATIVE_AVAILABLE,
    reason="native packing extension not built (python setup.py build_ext --inplace)")

IMPLS = [
    pytest.param((packing.balance_partitions_py, packing.split_microbatches_py), id="py"),
    pytest.param((getattr(packing._native, "balance_partitions", None),
                  getattr(packing._native, "split_microbatches", None)), id="native", marks=needs_native),
]


def lpt_reference(lengths, n_parts):
    """The rule written out literally: longest first (ties by index) to the smallest
    (load, count, part) tuple."""
    heap = [(0, 0, p) for p in range(n_parts)]
    parts = [[] for _ in range(n_parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, count, p = heapq.heappop(heap)
        parts[p].append(i)
        heapq.heappush(heap, (load + lengths[i], count + 1, p))
    return [sorted(p) for p in parts]


def random_lengths(rng, n):
    """Lengths with many ties (narrow ranges, repeated values) as well as wide ones."""
    style = rng.randrange(4)
    if style == 0:
        return [rng.randint(0, 3) for _ in range(n)]
    if style == 1:
        return [rng.choice([64, 128, 8192]) for _ in range(n)]
    if style == 2:
        return [rng.randint(64, 8192) for _ in range(n)]
    return [rng.randint(0, 2**40) for _ in range(n)]


@pytest.mark.parametrize("impl", IMPLS)
def test_partitions_cover_every_index_once_and_balance(impl):
    balance, _ = impl
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    parts = balance(lengths, 7)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(1000))
    loads = [sum(lengths[i] for i in p) for p in parts]
    # LPT greedy: max load <= mean + the longest item.
    assert max(loads) - sum(loads) / 7 <= max(lengths)


@pytest.mark.parametrize("impl", IMPLS)
def test_partitions_edge_cases(impl):
    balance, _ = impl
    assert balance([], 3) == [[], [], []]
    assert balance([], 1) == [[]]
    assert balance([5], 1) == [[0]]
    assert balance([5], 2) == [[0], []]
    assert balance([3, 3, 3, 3], 4) == [[0], [1], [2], [3]]
    assert balance([2, 7], 5) == [[1], [0], [], [], []]
    assert balance([4, 2, 2, 1, 1], 2) == [[0, 3], [1, 2, 4]]
    # Equal loads: the part holding fewer sequences wins (index 3 to part 1), then the lower index.
    assert balance([1, 1, 0, 0], 2) == [[0, 2], [1, 3]]
    assert balance([0, 0, 0], 2) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="n_parts must be >= 1, got 0"):
        balance([1], 0)
    with pytest.raises(ValueError, match=r"lengths\[1\] is -2; token counts must be >= 0"):
        balance([1, -2, -3], 2)


@needs_native
def test_native_partitions_identical_on_random_inputs():
    rng = random.Random(1234)
    for seed in range(300):
        n = rng.choice([0, 1, 2, rng.randint(3, 40), rng.randint(40, 400)])
        lengths = random_lengths(rng, n)
        n_parts = rng.choice([1, 2, rng.randint(1, 16), n + rng.randint(1, 5), max(1, n // 3)])
        expected = lpt_reference(lengths, n_parts)
        assert packing.balance_partitions_py(lengths, n_parts) == expected, seed
        assert packing._native.balance_partitions(lengths, n_parts) == expected, seed
        assert packing._native.balance_partitions(tuple(lengths), n_parts) == expected, seed
        assert sorted(i for p in expected for i in p) == list(range(n))


def test_python_partitions_match_the_literal_rule():
    rng = random.Random(7)
    for seed in range(200):
        lengths = random_lengths(rng, rng.randint(0, 200))
        n_parts = rng.randint(1, 40)
        assert packing.balance_partitions_py(lengths, n_parts) == lpt_reference(lengths, n_parts), seed


def test_partitions_outside_int64_fall_back_to_python():
    lengths = [2**70, 3, 2**70, 2**62, 2**62]  # too large for the extension's int64 keys
    assert balance_partitions(lengths, 2) == lpt_reference(lengths, 2)
    with pytest.raises(TypeError, match=r"lengths\[1\] is 2.5; token counts must be integers"):
        balance_partitions([1, 2.5], 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_microbatches_respect_count_and_token_budget(impl):
    _, split = impl
    lengths = [10, 30, 20, 40, 5]
    batches = split(range(5), lengths, 2, 60)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    for b in batches:
        assert len(b) <= 2
        assert max(lengths[i] for i in b) * len(b) <= 60
    assert split([], lengths, 2, 60) == []
    assert split([3], lengths, 1) == [[3]]
    with pytest.raises(ValueError, match="sequence 3 has 40 tokens, more than the micro-batch budget of 30"):
        split(range(5), lengths, 2, 30)
    with pytest.raises(IndexError, match="index 5 is out of range for 5 lengths"):
        split([0, 5], lengths, 2)
    with pytest.raises(IndexError, match="index -1 is out of range for 5 lengths"):
        split([-1], lengths, 2)
    with pytest.raises(ValueError, match=r"lengths\[0\] is -1; token counts must be >= 0"):
        split([0], [-1], 2)
    with pytest.raises(ValueError, match="max_sequences must be >= 1, got 0"):
        split([0], lengths, 0)
    with pytest.raises(ValueError, match="max_tokens must be >= 0, got -1"):
        split([0], lengths, 2, -1)


@needs_native
def test_native_microbatches_identical_on_random_inputs():
    rng = random.Random(99)
    for seed in range(300):
        n = rng.randint(0, 200)
        lengths = random_lengths(rng, n)
        indices = rng.sample(range(n), rng.randint(0, n))
        max_sequences = rng.randint(1, 12)
        longest = max(lengths, default=0)
        max_tokens = rng.choice([0, longest, longest * rng.randint(1, 6), 2**62])
        expected = packing.split_microbatches_py(indices, lengths, max_sequences, max_tokens)
        got = packing._native.split_microbatches(indices, lengths, max_sequences, max_tokens)
        assert got == expected, seed
        assert [i for b in got for i in b] == indices


def test_microbatches_take_iterators_and_huge_ints():
    lengths = [2**70, 1, 2]
    assert split_microbatches(iter([1, 2, 0]), lengths, 2) == [[1, 2], [0]]
    assert split_microbatches((i for i in [2, 1]), [3, 4, 5], 1, 5) == [[2], [1]]


def test_falls_back_to_python_without_the_extension():
    code = (
        "import sys; sys.modules['megatron_sdpg._packing_native'] = None\n"  # makes the import fail
        "from megatron_sdpg.data import packing as p\n"
        "assert not p.NATIVE_AVAILABLE\n"
        "assert p.balance_partitions([5, 1, 4, 2], 2) == [[0, 1], [2, 3]]\n"
        "assert p.split_microbatches([0, 1, 2], [5, 1, 4], 2) == [[0, 1], [2]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


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


def _samples_of_lengths(prompt_and_response: list[tuple[int, int]]) -> list[TrainSample]:
    out = []
    for i, (p, r) in enumerate(prompt_and_response):
        prompt = [10 + i] * p
        out.append(TrainSample(group=i, prompt_ids=prompt, teacher_prompt_ids=[99] + prompt,
                               response_ids=list(range(1, r + 1)), rollout_log_probs=[-0.5] * r))
    return out


def test_bucketed_microbatches_are_padded_to_their_own_length_and_sorted():
    from megatron_sdpg.train.batch import plan_microbatches

    lengths = [(3, 20), (3, 2), (4, 9), (3, 1), (5, 30), (2, 3)]  # student lengths 23 5 13 4 35 5
    samples = _samples_of_lengths(lengths)
    mbs = plan_microbatches(samples, 1, 0, micro_batch_size=2, max_tokens=0, pad_id=0, with_teacher=True,
                            pad_multiple=8, one_shape=False, sort_by_length=True)
    # Increasing padded length of the longer view (teacher: one token more): 8 8 8 16 24 40, ties by index
    firsts = [[int(t) for t in mb["tokens"][:, 0]] for mb in mbs]
    assert firsts == [[11, 13], [15, 12], [10, 14]]
    assert [tuple(mb["tokens"].shape) for mb in mbs] == [(2, 8), (2, 16), (2, 40)]
    assert [tuple(mb["teacher_tokens"].shape) for mb in mbs] == [(2, 8), (2, 16), (2, 40)]
    for mb in mbs:  # the rows still predict the response tokens in both views
        assert mb["tokens"].reshape(-1)[mb["resp_rows"] + 1].tolist() == mb["target"].tolist()
        assert mb["teacher_tokens"].reshape(-1)[mb["teacher_resp_rows"] + 1].tolist() == mb["target"].tolist()
    # One shape (pipeline parallelism): the old layout, every micro-batch [2, 40] in sample order
    same = plan_microbatches(samples, 1, 0, micro_batch_size=2, max_tokens=0, pad_id=0, with_teacher=True)
    assert {tuple(mb["tokens"].shape) for mb in same} == {(2, 40)}
    assert [[int(t) for t in mb["tokens"][:, 0]] for mb in same] == [[10, 11], [12, 13], [14, 15]]
    assert sum(mb["tokens"].numel() + mb["teacher_tokens"].numel() for mb in mbs) == 256
    assert sum(mb["tokens"].numel() + mb["teacher_tokens"].numel() for mb in same) == 480


def test_bucketed_token_budget_counts_each_microbatch_own_length():
    from megatron_sdpg.train.batch import plan_microbatches

    samples = _samples_of_lengths([(3, 1), (3, 2), (3, 1), (5, 30)])  # padded 8 8 8 40
    mbs = plan_microbatches(samples, 1, 0, micro_batch_size=8, max_tokens=40, pad_id=0, with_teacher=False,
                            pad_multiple=8, one_shape=False, sort_by_length=True)
    assert [tuple(mb["tokens"].shape) for mb in mbs] == [(3, 8), (1, 40)]
