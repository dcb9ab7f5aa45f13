"""Worked-sum verifier (task ``synthetic-long``): every step checked, in any valid order.

The reference ``answer`` is the solved equation ``47+85+36=168``. A response is steps
``x+y=z`` separated by ``;`` (whitespace around tokens allowed), the last result boxed,
``47+36=83;83+85=\\boxed{168}``. It is correct iff, starting from the board of the
question's numbers (a multiset), every step takes two numbers on the board, replaces them
by their sum ``z`` (checked), and after the last step the board holds only the boxed
total, which equals the reference total. Any order of the steps and of the operands is
accepted (chains and trees); numbers must be written without leading zeros.
"""

from __future__ import annotations

import re
from collections import Counter

_MAX_STEPS = 64
_NUM = r"(0|[1-9]\d{0,17})"
_STEP = re.compile(rf"\s*{_NUM}\s*\+\s*{_NUM}\s*=\s*{_NUM}\s*")
_LAST = re.compile(rf"\s*{_NUM}\s*\+\s*{_NUM}\s*=\s*\\boxed\{{\s*{_NUM}\s*\}}\s*")
_ANSWER = re.compile(rf"{_NUM}(?:\+{_NUM})+={_NUM}")


def parse_answer(answer: str) -> tuple[list[int], int] | None:
    """``"47+85+36=168" -> ([47, 85, 36], 168)``, or None if malformed or not a true sum."""
    answer = answer.strip()
    if not _ANSWER.fullmatch(answer):
        return None
    left, _, total = answer.partition("=")
    numbers = [int(x) for x in left.split("+")]
    return (numbers, int(total)) if sum(numbers) == int(total) else None


def verify(response: str, answer: str) -> bool:
    """True iff ``response`` is a valid worked sum of the question in ``answer`` (see module docstring)."""
    gold = parse_answer(answer)
    if gold is None:
        return False
    numbers, total = gold
    steps = response.strip().split(";")
    if len(steps) != len(numbers) - 1 or len(steps) > _MAX_STEPS:
        return False
    board = Counter(numbers)
    for i, step in enumerate(steps):
        match = (_LAST if i == len(steps) - 1 else _STEP).fullmatch(step)
        if match is None:
            return False
        x, y, z = (int(g) for g in match.groups())
        board[x] -= 1
        board[y] -= 1
        if board[x] < 0 or board[y] < 0 or x + y != z:
            return False
        board[z] += 1
    return +board == Counter([total])
