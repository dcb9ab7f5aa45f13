"""The prompt source: seeded order, epochs, and exact resumption."""

import pytest

from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.source import PromptSource

PROBLEMS = [Problem(id=str(i), question=f"q{i}", answer=str(i)) for i in range(10)]


def ids(batch):
    return [p.id for p in batch]


def test_epochs_are_permutations_and_seeded():
    src = PromptSource(PROBLEMS, batch_size=5, seed=3)
    epoch0 = ids(src.next_batch()) + ids(src.next_batch())
    epoch1 = ids(src.next_batch()) + ids(src.next_batch())
    assert sorted(epoch0) == sorted(epoch1) == sorted(p.id for p in PROBLEMS)
    assert epoch0 != epoch1
    again = PromptSource(PROBLEMS, batch_size=5, seed=3)
    assert ids(again.next_batch()) == epoch0[:5]
    assert ids(PromptSource(PROBLEMS, 10, shuffle=False).next_batch()) == [str(i) for i in range(10)]


def test_resume_continues_with_the_same_batches():
    ref = PromptSource(PROBLEMS, batch_size=4, seed=1)
    expected = [ids(ref.next_batch()) for _ in range(8)]  # crosses epoch boundaries mid-batch
    src = PromptSource(PROBLEMS, batch_size=4, seed=1)
    got = [ids(src.next_batch()) for _ in range(3)]
    state = src.state_dict()
    resumed = PromptSource(PROBLEMS, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    got += [ids(resumed.next_batch()) for _ in range(5)]
    assert got == expected


def test_mismatched_state_is_rejected():
    state = PromptSource(PROBLEMS, 4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        PromptSource(PROBLEMS, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_problems=10"):
        PromptSource(PROBLEMS[:5], 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptSource([], 4)
