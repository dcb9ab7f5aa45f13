"""The synthetic-long task: generation, splits, prompts, and its worked-sum verifier."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from megatron_sdpg.data.config import DataConfig
from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.tasks import build_task, get_task
from megatron_sdpg.data.tasks.synthetic import SPLITS, split_of
from megatron_sdpg.data.tasks.synthetic_long import solution_order
from megatron_sdpg.eval import response_budget
from megatron_sdpg.data.templates import get_template
from megatron_sdpg.rewards.registry import resolve_verifier
from megatron_sdpg.rewards.worked_sum import verify
from megatron_sdpg.tiny.warm_start import warm_start_targets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def all_orders(numbers: list[int]) -> list[str]:
    """Independent reference: every valid worked sum (any two board numbers per step, either operand order)."""
    if len(numbers) == 1:
        return [""]
    out = []
    for i, j in itertools.permutations(range(len(numbers)), 2):
        x, y = numbers[i], numbers[j]
        rest = [v for k, v in enumerate(numbers) if k not in (i, j)] + [x + y]
        for tail in all_orders(rest):
            z = f"\\boxed{{{x + y}}}" if len(rest) == 1 else str(x + y)
            out.append(f"{x}+{y}={z}" + (";" + tail if tail else ""))
    return out


def test_generation_is_long_deterministic_and_the_context_is_one_valid_solution():
    task = get_task("synthetic-long")
    assert task.options.terms == 7 and task.default_verifier == "worked_sum" and task.generated
    problems = task.problems("train", 100, seed=3)
    assert problems == task.problems("train", 100, seed=3) and problems != task.problems("train", 100, seed=4)
    assert len({p.question for p in problems}) == 100
    orders = set()
    for p in problems:
        numbers = [int(x) for x in p.question.split("+")]
        assert len(numbers) == 7 and all(10 <= x <= 99 for x in numbers)
        assert p.answer == f"{p.question}={sum(numbers)}"
        response = task.teacher_reference_response(p)
        assert verify(response, p.answer) and response.count(";") == 5 and len(response) >= 60
        # the context is the teacher's reference solution without the box: not the response string
        assert p.context == "solution " + response.replace("\\boxed{", "").removesuffix("}")
        assert p.context != response and p.answer not in p.context
        orders.add(tuple(solution_order(p.question)))
    assert len(orders) > 90  # the solution's order is a hash of the question: nearly all differ


def chain(numbers: list[int]) -> str:
    """Independent reference: ``numbers`` added left to right, every step written, the last boxed."""
    steps, total = [], numbers[0]
    for x in numbers[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return ";".join(steps[:-1] + [steps[-1].replace(f"={total}", f"=\\boxed{{{total}}}")])


def test_reference_order_left_to_right_student_targets_and_hashed_teacher_targets():
    task = get_task("synthetic-long")
    hashed = get_task("synthetic-long", reference_order="hashed")
    assert task.options.reference_order == "left_to_right"
    assert task.describe()["task_options"]["reference_order"] == "left_to_right"
    assert hashed.describe()["task_options"]["reference_order"] == "hashed"
    problems = task.problems("train", 40, seed=5)
    assert problems == hashed.problems("train", 40, seed=5)  # the option changes only the warm-start targets
    differ = 0
    for p in problems:
        numbers = [int(x) for x in p.question.split("+")]
        student, teacher = task.reference_response(p), task.teacher_reference_response(p)
        assert student == chain(numbers) and verify(student, p.answer)
        assert teacher == chain([numbers[i] for i in solution_order(p.question)]) and verify(teacher, p.answer)
        assert p.context == "solution " + teacher.replace("\\boxed{", "").removesuffix("}")
        assert hashed.reference_response(p) == hashed.teacher_reference_response(p) == teacher
        differ += student != teacher
    assert differ >= 38  # the context is another order's solution, not the student's answer string
    # one warm-start batch: teacher prompts on the context's order, student prompts left to right
    targets = warm_start_targets(task, problems[:8], 3)
    assert targets == [task.teacher_reference_response(p) for p in problems[:3]] + [
        chain([int(x) for x in p.question.split("+")]) for p in problems[3:8]]
    assert warm_start_targets(hashed, problems[:8], 3) == [hashed.teacher_reference_response(p) for p in problems[:8]]
    with pytest.raises(ValueError, match="reference_order='random'"):
        get_task("synthetic-long", reference_order="random")


def test_teacher_mix_gives_a_hashed_share_of_teacher_targets_the_students_order():
    mixed = get_task("synthetic-long", teacher_mix=0.3)
    problems = mixed.problems("train", 1000, seed=6)
    own = 0
    for p in problems:
        numbers = [int(x) for x in p.question.split("+")]
        teacher = mixed.teacher_reference_response(p)
        assert mixed.reference_response(p) == chain(numbers) and verify(teacher, p.answer)
        if teacher == chain(numbers):
            own += 1
        else:
            assert teacher == chain([numbers[i] for i in solution_order(p.question)])
    assert 240 <= own <= 360  # ~30% of the questions, a fixed hash of the question
    assert [mixed.teacher_reference_response(p) for p in problems[:50]] == [
        get_task("synthetic-long", teacher_mix=0.3).teacher_reference_response(p) for p in problems[:50]]
    for bad in (1.5, -0.1, True, "x", float("nan")):
        with pytest.raises(ValueError, match="teacher_mix="):
            get_task("synthetic-long", teacher_mix=bad)
    # with reference_order=hashed the student's target is the context's solution already: the mix changes nothing
    # (it recursed between the two targets without end)
    hashed = get_task("synthetic-long", reference_order="hashed", teacher_mix=1.0)
    for p in problems[:20]:
        numbers = [int(x) for x in p.question.split("+")]
        assert (hashed.teacher_reference_response(p) == hashed.reference_response(p)
                == chain([numbers[i] for i in solution_order(p.question)]))


def test_plan_context_and_options():
    task = get_task("synthetic-long", terms=4, digits=3, min_digits=1, context="plan")
    for p in task.problems("valid", 30):
        numbers = [int(x) for x in p.question.split("+")]
        plan = [int(x) for x in p.context.removeprefix("order ").split(",")]
        assert sorted(plan) == sorted(numbers) and verify(task.reference_response(p), p.answer)
    for bad in ({"terms": 2}, {"terms": 13}, {"digits": 0}, {"min_digits": 3, "digits": 2}, {"context": "answer"},
                {"terms": True}):
        with pytest.raises(ValueError, match="synthetic-long task"):
            get_task("synthetic-long", **bad)
    with pytest.raises(TypeError, match="unknown option"):
        get_task("synthetic-long", response="scratchpad")
    with pytest.raises(ValueError, match="fewer than 100 distinct"):
        get_task("synthetic-long", terms=3, digits=1, min_digits=1).problems("heldout", 100)
    with pytest.raises(ValueError, match="unknown split"):
        task.problems("test", 1)


def test_splits_are_hash_disjoint():
    task = get_task("synthetic-long")
    drawn = {s: set() for s in SPLITS}
    for seed in (0, 1, 2):
        for s in SPLITS:
            qs = {p.question for p in task.problems(s, 200, seed=seed)}
            assert all(split_of(q) == s for q in qs)
            drawn[s] |= qs
    for a, b in itertools.combinations(SPLITS, 2):
        assert not drawn[a] & drawn[b], (a, b)


def test_verifier_accepts_every_valid_order_and_only_those():
    numbers = [47, 85, 36, 12]
    answer = "47+85+36+12=180"
    valid = all_orders(numbers)
    assert len(valid) == 4 * 3 * 3 * 2 * 2 * 1  # ordered operand pairs per step: 12 * 6 * 2
    assert all(verify(r, answer) for r in valid)
    assert verify(" 47 + 85 = 132 ; 12+36=48;132+48=\\boxed{ 180 }\n", answer)  # whitespace, a tree
    wrong = [
        "47+85=132;132+36=168;168+12=\\boxed{181}",  # wrong final sum
        "47+85=133;133+36=169;169+11=\\boxed{180}",  # wrong step, compensated later
        "47+85=133;133+36=169;169+12=\\boxed{180}",  # wrong sums, right numbers used, right total boxed
        "47+85=132;132+36=168;168+12=180",  # no box
        "47+85=132;132+36=\\boxed{168};168+12=180",  # box not last
        "47+85=132;132+48=\\boxed{180}",  # a step missing (36+12 skipped)
        "47+47=94;94+86=180;180+0=\\boxed{180}",  # a number used twice, others missing
        "47+85=132;132+36=168;168+12=180;180+0=\\boxed{180}",  # extra step
        "\\boxed{180}",  # the answer without the work
        "47+85=132;132+036=168;168+12=\\boxed{180}",  # leading zero
        "47+85=132;132+36=168;168-12=\\boxed{180}",  # not an addition
        "",
        "47+85=132;;132+36=168;168+12=\\boxed{180}",
    ]
    assert not any(verify(r, answer) for r in wrong)
    good = valid[0]
    for bad_answer in ("180", "47+85+36+12=181", "47+85+36+12=", "x=180", ""):
        assert not verify(good, bad_answer)
    assert resolve_verifier("worked_sum") is verify


def test_verifier_on_duplicate_numbers_and_random_garbage():
    assert verify("7+7=14;14+7=\\boxed{21}", "7+7+7=21")
    assert not verify("7+7=14;14+14=\\boxed{28}", "7+7+7=21")
    import random

    rng = random.Random(0)
    alphabet = "0123456789+=;\\boxed{} "
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        assert verify(text, "47+85+36+12=180") in (False, True)


def test_prompts_with_and_without_context():
    task = get_task("synthetic-long")
    p = task.problems("heldout", 1)[0]
    template = get_template(task.default_template)
    student, teacher = template.render_student(p), template.render_teacher(p)
    assert student == p.question and p.context not in student and "solution" not in student
    assert teacher == f"{p.question}\n[Hint] {p.context}"
    # compact states the answer (the solved equation) and the solution
    compact = get_template("compact").render_teacher(p)
    assert p.answer in compact and p.context in compact
    bare = Problem(id="x", question=p.question, answer=p.answer)
    assert template.render_teacher(bare).endswith(f"The correct answer is {p.answer}.")


def test_build_task_from_config():
    cfg = DataConfig(task="synthetic-long", task_options={"terms": 5}, template="context_only")
    cfg.validate("data")
    task = build_task(cfg)
    assert task.name == "synthetic-long" and task.options.terms == 5


def test_make_tiny_model_builds_for_the_task(tmp_path):
    out = tmp_path / "model"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--out", str(out), "--size", "test",
           "--task", "synthetic-long", "--task-option", "terms=4", "--steps", "2", "--eval-every", "2",
           "--task-option", "reference_order=hashed", "--eval-n", "4", "--report-n", "4", "--batch-size", "8"]
    # ~10 CPU-seconds; the timeout is a hang guard with room for a machine shared by many jobs
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["task"] == "synthetic-long" and summary["template"] == "context_only"
    assert summary["task_options"]["terms"] == 4 and summary["heldout_n"] == 4
    meta = json.load(open(out / "sdpg_task.json"))
    assert meta["history"][0]["step"] == 2
    assert meta["task_options"] == {**get_task("synthetic-long").describe()["task_options"],
                                    "terms": 4, "reference_order": "hashed"}
    # the evaluation reads the options back from sdpg_task.json (terms overridden to 7), and its default
    # generation cap grows to hold 7-term responses (61-67 tokens; the general default is 64)
    proc = subprocess.run([sys.executable, "-m", "megatron_sdpg.eval", "--hf-dir", str(out), "--task", "synthetic-long",
                           "--task-option", "terms=7", "--n", "2", "--threads", "1"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["task_options"] == {**meta["task_options"], "terms": 7}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    task = get_task("synthetic-long", terms=4)
    for p in task.problems("heldout", 5):
        for text in (task.reference_response(p), p.context):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == text
    full = get_task("synthetic-long", reference_order="hashed")
    longest = max(len(tok(ref(p), add_special_tokens=False)["input_ids"]) for p in full.problems("heldout", 2)
                  for ref in (full.reference_response, full.teacher_reference_response))
    assert longest > 64 and result["max_new_tokens"] == longest + 5
    assert response_budget(tok, full, full.problems("heldout", 2)) == longest + 5
