"""The synthetic verifiable task of the embedded CPU default: multi-step addition.

A question is a sum of ``terms`` numbers of ``min_digits``..``digits`` digits, e.g.
``47+85+36``. The reference response is a worked left-to-right scratchpad ending in
the boxed answer, ``47+85=132;132+36=\\boxed{168}`` (``response="answer_only"``
gives just ``\\boxed{168}``, the control of LEARNING_NOTES.md).

The privileged context (``context="carries"``) holds the carry digits of every
step, aligned with the digits of that step's result, most significant first:
``carries 110;100`` (47+85: units 7+5=12 carry 1, tens 4+8+1=13 carry 1, so the
result digits 1,3,2 receive carries 1,1,0). The carries are the hard, non-local part
of addition; with them each result digit is a local ``(a+b+carry) mod 10``. They
are not the answer string and cannot be copied into the response.
``context="answer"`` leaves the context empty, so templates show the answer alone.

Splits are a fixed function of the question (a hash bucket), independent of seeds
and sizes: no training seed can draw a held-out question. ``problems(split, n,
seed)`` draws ``n`` distinct questions of that bucket from a seeded generator.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from megatron_sdpg.data.problem import Problem

SPLITS = ("train", "valid", "heldout")
_BUCKETS = 1000
_HELDOUT_BUCKETS = 50  # 5% of the question space
_VALID_BUCKETS = 50  # 5%, for checkpoint picking; never reported


@dataclass(frozen=True)
class SyntheticOptions:
    """Task options (``data.task_options`` in config).

    Attributes:
        terms: Numbers summed (steps = terms - 1).
        digits: Most digits per number.
        min_digits: Fewest digits per number.
        response: ``scratchpad`` (worked steps + boxed answer) or ``answer_only``.
        context: ``carries`` (hints per step) or ``answer`` (no context: the template
            states the answer).
    """

    terms: int = 3
    digits: int = 2
    min_digits: int = 2
    response: str = "scratchpad"
    context: str = "carries"

    def problems_with_options(self) -> str | None:
        """A one-line description of what is wrong, or None."""
        for name in ("terms", "digits", "min_digits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{name}={value!r} must be an integer"
        if not 2 <= self.terms <= 8:
            return f"terms={self.terms} must be in [2, 8]"
        if not 1 <= self.min_digits <= self.digits <= 6:
            return f"need 1 <= min_digits ({self.min_digits}) <= digits ({self.digits}) <= 6"
        if self.response not in ("scratchpad", "answer_only"):
            return f"response={self.response!r} must be 'scratchpad' or 'answer_only'"
        if self.context not in ("carries", "answer"):
            return f"context={self.context!r} must be 'carries' or 'answer'"
        return None


def split_of(question: str) -> str:
    """The split a question belongs to, fixed by a hash of its text."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big")
    bucket %= _BUCKETS
    if bucket < _HELDOUT_BUCKETS:
        return "heldout"
    if bucket < _HELDOUT_BUCKETS + _VALID_BUCKETS:
        return "valid"
    return "train"


def carries_of_sum(a: int, b: int) -> str:
    """Carry-in digit of every digit of ``a + b``, most significant first.

    Example: ``carries_of_sum(47, 85) == "110"`` (47+85=132).
    """
    total = a + b
    carries = []
    carry = 0
    for _ in range(len(str(total))):
        carries.append(carry)
        carry = (a % 10 + b % 10 + carry) // 10
        a //= 10
        b //= 10
    return "".join(str(c) for c in reversed(carries))


def parse_operands(question: str) -> list[int]:
    """``"47+85+36" -> [47, 85, 36]``."""
    return [int(x) for x in question.split("+")]


class SyntheticTask:
    """Multi-step addition with carries as privileged context (see module docstring)."""

    name = "synthetic"
    default_verifier = "numeric"
    generated = True

    def __init__(self, **options):
        known = {f.name for f in fields(SyntheticOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"synthetic task: unknown option(s) {unknown}; known: {sorted(known)}")
        self.options = SyntheticOptions(**options)
        problem = self.options.problems_with_options()
        if problem:
            raise ValueError(f"synthetic task: {problem}")

    def describe(self) -> dict:
        """The task's name and options (recorded beside models built for it)."""
        return {"task": self.name, "task_options": asdict(self.options)}

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split``, deterministic in ``seed``.

        Raises:
            ValueError: unknown split, or the split has fewer than ``n`` questions.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        opts = self.options
        low, high = 10 ** (opts.min_digits - 1), 10**opts.digits
        if opts.min_digits == 1:
            low = 0
        share = {"heldout": _HELDOUT_BUCKETS, "valid": _VALID_BUCKETS}.get(split, _BUCKETS - _HELDOUT_BUCKETS - _VALID_BUCKETS)
        expected = (high - low) ** opts.terms * share / _BUCKETS
        if n > 1.2 * expected + 100:  # far beyond the split's size: fail now, not after a long search
            from megatron_sdpg.config.errors import ConfigError

            raise ConfigError("data.train_size" if split == "train" else "train.eval_n",
                              f"synthetic task: split {split!r} has fewer than {n} distinct questions with {opts} "
                              f"(about {int(expected)})")
        seen: set[str] = set()
        out: list[Problem] = []
        budget = 50 * n + 10_000
        while len(out) < n:
            chunk = rng.integers(low, high, size=(max(64, n - len(out)), opts.terms))
            for row in chunk.tolist():
                budget -= 1
                question = "+".join(str(x) for x in row)
                if question in seen or split_of(question) != split:
                    continue
                seen.add(question)
                out.append(self.make_problem(f"synthetic/{split}/{seed}/{len(out)}", row))
                if len(out) == n:
                    break
            if budget <= 0 and len(out) < n:
                from megatron_sdpg.config.errors import ConfigError

                raise ConfigError("data.train_size" if split == "train" else "train.eval_n",
                                  f"synthetic task: split {split!r} has fewer than {n} distinct questions with {opts}")
        return out

    def make_problem(self, pid: str, operands: list[int]) -> Problem:
        """The problem summing ``operands``."""
        question = "+".join(str(x) for x in operands)
        context = ""
        if self.options.context == "carries":
            steps, total = [], operands[0]
            for x in operands[1:]:
                steps.append(carries_of_sum(total, x))
                total += x
            context = "carries " + ";".join(steps)
        return Problem(id=pid, question=question, answer=str(sum(operands)), context=context)

    def reference_response(self, problem: Problem) -> str:
        """The worked solution in the response format (used by the warm start)."""
        operands = parse_operands(problem.question)
        final = f"\\boxed{{{sum(operands)}}}"
        if self.options.response == "answer_only":
            return final
        steps, total = [], operands[0]
        for i, x in enumerate(operands[1:]):
            last = i == len(operands) - 2
            steps.append(f"{total}+{x}={final if last else total + x}")
            total += x
        return ";".join(steps)
