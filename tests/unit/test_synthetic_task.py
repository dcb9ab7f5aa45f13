"""The synthetic addition task: splits, determinism, carries, and its verifier."""

import pytest

from megatron_sdpg.data.tasks import build_task, get_task
from megatron_sdpg.data.config import DataConfig
from megatron_sdpg.data.tasks.synthetic import SPLITS, carries_of_sum, parse_operands, split_of
from megatron_sdpg.rewards.numeric import verify


def column_carries(a: int, b: int) -> str:
    """Independent reference: schoolbook addition on digit strings, carry-in per result digit."""
    total = str(a + b)
    da, db = str(a).zfill(len(total)), str(b).zfill(len(total))
    carries, carry = [], 0
    for i in range(len(total) - 1, -1, -1):
        carries.append(str(carry))
        carry = (int(da[i]) + int(db[i]) + carry) // 10
    return "".join(reversed(carries))


def test_carries_match_schoolbook_addition():
    assert carries_of_sum(47, 85) == "110"
    for a in range(0, 1000, 7):
        for b in range(0, 1000, 13):
            assert carries_of_sum(a, b) == column_carries(a, b), (a, b)


def test_splits_disjoint_and_a_function_of_the_question():
    task = get_task("synthetic")
    drawn = {s: {p.question for p in task.problems(s, 300, seed=seed)} for s in SPLITS for seed in (0,)}
    for seed in (1, 2):
        for s in SPLITS:
            qs = {p.question for p in task.problems(s, 300, seed=seed)}
            assert all(split_of(q) == s for q in qs)
            drawn[s] |= qs
    assert not (drawn["train"] & drawn["heldout"]) and not (drawn["train"] & drawn["valid"])
    assert not (drawn["valid"] & drawn["heldout"])


def test_deterministic_from_seed_and_distinct():
    task = get_task("synthetic", terms=4, digits=3)
    a, b = task.problems("heldout", 200, seed=5), task.problems("heldout", 200, seed=5)
    assert a == b and len({p.question for p in a}) == 200
    assert a != task.problems("heldout", 200, seed=6)
    assert task.problems("train", 50, seed=5) == task.problems("train", 100, seed=5)[:50]


@pytest.mark.parametrize("options", [{}, {"terms": 4, "digits": 3}, {"terms": 2, "digits": 3, "min_digits": 1},
                                     {"response": "answer_only", "context": "answer"}])
def test_reference_responses_verify_and_carries_are_consistent(options):
    task = get_task("synthetic", **options)
    answer_in_context = 0
    for p in task.problems("train", 200, seed=1):
        ops = parse_operands(p.question)
        assert p.answer == str(sum(ops))
        response = task.reference_response(p)
        assert verify(response, p.answer)
        assert not verify(response, str(int(p.answer) + 1))
        if task.options.context == "carries":
            steps = p.context.removeprefix("carries ").split(";")
            total = ops[0]
            for step, x in zip(steps, ops[1:]):
                assert step == column_carries(total, x)
                total += x
            answer_in_context += p.answer in p.context.split(" ")[1].split(";")
        else:
            assert p.context == ""
        if task.options.response == "answer_only":
            assert response == f"\\boxed{{{p.answer}}}"
        else:
            assert response.count(";") == len(ops) - 2 and response.endswith(f"\\boxed{{{p.answer}}}")
    assert answer_in_context <= 10  # the hint is not the answer string (equal only by coincidence)


def test_bad_options_and_small_splits():
    for bad in ({"terms": 1}, {"digits": 0}, {"min_digits": 3, "digits": 2}, {"response": "x"}, {"context": "y"}):
        with pytest.raises(ValueError, match="synthetic task"):
            get_task("synthetic", **bad)
    with pytest.raises(TypeError):
        get_task("synthetic", nonsense=1)
    with pytest.raises(ValueError, match="fewer than 100 distinct"):
        get_task("synthetic", terms=2, digits=1, min_digits=1).problems("heldout", 100)
    with pytest.raises(ValueError, match="unknown split"):
        get_task("synthetic").problems("test", 1)


def test_build_task_from_config():
    cfg = DataConfig(task="synthetic", task_options={"terms": 2})
    cfg.validate("data")
    task = build_task(cfg)
    assert task.options.terms == 2 and task.default_verifier == "numeric" and task.generated
