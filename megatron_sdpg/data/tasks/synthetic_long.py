"""``synthetic-long``: a long worked sum with many valid orders, and one worked solution as context.

A question is a sum of ``terms`` numbers, e.g. ``47+85+36+12+90+63``. A response adds
two numbers at a time and writes every step, ``x+y=z`` separated by ``;``, the last
result boxed: ``63+12=75;75+47=122;122+90=212;212+36=248;248+85=\\boxed{333}``. Any
order is valid: each step may combine any two numbers still on the board (a question
number not yet used, or an earlier result), so 7 terms have 56,700 valid step sequences
(chains and trees; 64 times as many written forms with the operands of a step swapped).
The verifier (``rewards/worked_sum.py``) checks every step's arithmetic and that the steps
use each question number exactly once, not only the final number: a boxed total without
valid work is wrong.

The privileged context (``context="solution"``) is one worked solution, a chain (running
total) in an order drawn from a hash of the question, without the box,
``solution 63+12=75;75+47=122;...;248+85=333``: across problems every order is equally
likely, so a student cannot predict it. It helps (a teacher that follows its order copies
every number) without being the only answer. ``context="plan"`` gives only the order,
``order 63,12,47,90,36,85`` (the bookkeeping without the arithmetic).

The warm start (``tools/make_tiny_model.py``) trains the teacher prompt on the context's
solution (:meth:`SyntheticLongTask.teacher_reference_response`) and the student prompt on
:meth:`SyntheticLongTask.reference_response`, whose order is the option
``reference_order``:

- ``left_to_right`` (default): the chain in the question's order,
  ``47+85=132;132+36=168;...``. A ~1M-parameter student can learn it (the next number
  is always the next one in the question), so the start model solves some problems
  without the context; with the context it copies a solution in a *different* order,
  so the teacher's partial sums are not the student's answer string: a student that
  goes left to right gets from the teacher the context's order at the first step that
  differs, and must then compute sums the context does not hold.
- ``hashed``: the student is trained on the context's order too (the first version of
  this task). A ~1M-parameter student cannot track which of 7 numbers a hashed order
  has used; it reuses and skips numbers and stays at 0% without the context
  (docs/synthetic_task.md).

``teacher_mix`` (default 0) gives that share of the questions (a hash of the question)
the student's target under the teacher prompt too, so the teacher also learns to continue
a response in another order than the context's. Both options change only the warm start's
targets; questions, context, splits and the verifier (any valid order) are the same.

``problem.answer`` is the solved equation, ``47+85+36+12+90+63=333``: the verifier
needs the question's numbers to check the work (its interface is ``(response, answer)``).

Splits are the hash buckets of ``synthetic.split_of`` (5% heldout, 5% valid, 90% train),
a fixed function of the question text, independent of every seed and size.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.tasks.synthetic import _BUCKETS, _HELDOUT_BUCKETS, _VALID_BUCKETS, SPLITS, split_of


REFERENCE_ORDERS = ("left_to_right", "hashed")


@dataclass(frozen=True)
class SyntheticLongOptions:
    """Task options (``data.task_options`` in config).

    Attributes:
        terms: Numbers summed (steps = terms - 1).
        digits: Most digits per number.
        min_digits: Fewest digits per number.
        context: ``solution`` (one worked solution) or ``plan`` (its order of the numbers).
        reference_order: Order of the student prompt's warm-start target:
            ``left_to_right`` (the question's order) or ``hashed`` (the context's order).
        teacher_mix: Share of problems (a hash of the question) whose teacher-prompt
            warm-start target is the student's target instead of the context's solution,
            so that the teacher also learns to continue a response in another order.
    """

    terms: int = 7
    digits: int = 2
    min_digits: int = 2
    context: str = "solution"
    reference_order: str = "left_to_right"
    teacher_mix: float = 0.0

    def problems_with_options(self) -> str | None:
        """A one-line description of what is wrong, or None."""
        for name in ("terms", "digits", "min_digits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{name}={value!r} must be an integer"
        if not 3 <= self.terms <= 12:
            return f"terms={self.terms} must be in [3, 12]"
        if not 1 <= self.min_digits <= self.digits <= 6:
            return f"need 1 <= min_digits ({self.min_digits}) <= digits ({self.digits}) <= 6"
        if self.context not in ("solution", "plan"):
            return f"context={self.context!r} must be 'solution' or 'plan'"
        if isinstance(self.teacher_mix, bool) or not isinstance(self.teacher_mix, (int, float)) \
                or not 0.0 <= self.teacher_mix <= 1.0:
            return f"teacher_mix={self.teacher_mix!r} must be a number in [0, 1]"
        if self.reference_order not in REFERENCE_ORDERS:
            return f"reference_order={self.reference_order!r} must be one of {list(REFERENCE_ORDERS)}"
        return None


def solution_order(question: str) -> list[int]:
    """The reference solution's order of the question's numbers (indices), a hash of the question."""
    operands = question.split("+")
    seed = int.from_bytes(hashlib.blake2b(("order:" + question).encode(), digest_size=8).digest(), "big")
    return np.random.default_rng(seed).permutation(len(operands)).tolist()


def chain_steps(numbers: list[int]) -> list[tuple[int, int, int]]:
    """``(running total, next number, new total)`` of adding ``numbers`` left to right."""
    steps, total = [], numbers[0]
    for x in numbers[1:]:
        steps.append((total, x, total + x))
        total += x
    return steps


class SyntheticLongTask:
    """Long worked sums with many valid orders (see module docstring)."""

    name = "synthetic-long"
    default_verifier = "worked_sum"
    default_template = "context_only"
    generated = True

    def __init__(self, **options):
        known = {f.name for f in fields(SyntheticLongOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"synthetic-long task: unknown option(s) {unknown}; known: {sorted(known)}")
        self.options = SyntheticLongOptions(**options)
        problem = self.options.problems_with_options()
        if problem:
            raise ValueError(f"synthetic-long task: {problem}")

    def describe(self) -> dict:
        """The task's name and options (recorded beside models built for it)."""
        return {"task": self.name, "task_options": asdict(self.options)}

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split``, deterministic in ``seed``.

        Raises:
            ValueError: unknown split.
            ConfigError: the split has fewer than ``n`` questions.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        from megatron_sdpg.config.errors import ConfigError

        opts = self.options
        low, high = (0 if opts.min_digits == 1 else 10 ** (opts.min_digits - 1)), 10**opts.digits
        share = {"heldout": _HELDOUT_BUCKETS, "valid": _VALID_BUCKETS}.get(
            split, _BUCKETS - _HELDOUT_BUCKETS - _VALID_BUCKETS)
        field = "data.train_size" if split == "train" else "train.eval_n"
        if n > 1.2 * (high - low) ** opts.terms * share / _BUCKETS + 100:
            raise ConfigError(field, f"synthetic-long task: split {split!r} has fewer than {n} distinct "
                                     f"questions with {opts}")
        rng = np.random.default_rng([seed, SPLITS.index(split), 7])
        seen: set[str] = set()
        out: list[Problem] = []
        budget = 50 * n + 10_000
        while len(out) < n:
            for row in rng.integers(low, high, size=(max(64, n - len(out)), opts.terms)).tolist():
                budget -= 1
                question = "+".join(str(x) for x in row)
                if question in seen or split_of(question) != split:
                    continue
                seen.add(question)
                out.append(self.make_problem(f"synthetic-long/{split}/{seed}/{len(out)}", row))
                if len(out) == n:
                    break
            if budget <= 0 and len(out) < n:
                raise ConfigError(field, f"synthetic-long task: split {split!r} has fewer than {n} distinct "
                                         f"questions with {opts}")
        return out

    def make_problem(self, pid: str, operands: list[int]) -> Problem:
        """The problem summing ``operands``."""
        question = "+".join(str(x) for x in operands)
        ordered = [operands[i] for i in solution_order(question)]
        if self.options.context == "plan":
            context = "order " + ",".join(str(x) for x in ordered)
        else:
            context = "solution " + ";".join(f"{a}+{b}={c}" for a, b, c in chain_steps(ordered))
        return Problem(id=pid, question=question, answer=f"{question}={sum(operands)}", context=context)

    def reference_response(self, problem: Problem) -> str:
        """The student prompt's warm-start target: a worked chain in ``reference_order``, last result boxed."""
        operands = [int(x) for x in problem.question.split("+")]
        if self.options.reference_order == "left_to_right":
            return _boxed_chain(operands)
        return _context_chain(problem.question)

    def teacher_reference_response(self, problem: Problem) -> str:
        """The teacher prompt's warm-start target: the worked solution in the context's order, boxed
        (for a ``teacher_mix`` share of the questions, by hash: the student's target)."""
        question = problem.question
        if self.options.teacher_mix > 0 and _unit_hash("teacher:" + question) < self.options.teacher_mix:
            return self.reference_response(problem)
        return _context_chain(question)


def _context_chain(question: str) -> str:
    """The worked solution in the context's (hashed) order, last result boxed."""
    operands = [int(x) for x in question.split("+")]
    return _boxed_chain([operands[i] for i in solution_order(question)])


def _unit_hash(text: str) -> float:
    """A number in [0, 1), a fixed function of ``text``."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def _boxed_chain(numbers: list[int]) -> str:
    """``"a+b=c;c+d=\\boxed{e}"``: ``numbers`` added left to right, every step written."""
    steps = chain_steps(numbers)
    text = [f"{a}+{b}={c}" for a, b, c in steps[:-1]]
    a, b, c = steps[-1]
    return ";".join(text + [f"{a}+{b}=\\boxed{{{c}}}"])
