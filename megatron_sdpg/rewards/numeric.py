"""Numeric-answer verifier: exact rational equality of the final number.

The final answer is the last ``\\boxed{}`` content, else the text after ``####``,
else the last number in the response. Numbers may have a sign, thousands commas,
a decimal part or be a fraction ``a/b``; ``0.50``, ``1/2`` and ``\\frac{1}{2}`` are
all one half. Used by the synthetic task.
"""

from __future__ import annotations

import re
from fractions import Fraction

from megatron_sdpg.rewards.extract import final_answer

_MAX_NUMBER_CHARS = 64
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")


def parse_number(text: str) -> Fraction | None:
    """The value of a number written as text, or None if it is not one number."""
    s = text.strip().strip("$").strip().rstrip(".").replace(" ", "")
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    frac = _FRAC.match(s)
    if frac:
        num, den = int(frac.group(1)), int(frac.group(2))
        return Fraction(num, den) if den else None
    if not _NUMBER.fullmatch(s):
        return None
    s = s.replace(",", "")
    num, _, den = s.partition("/")
    if den and int(den) == 0:
        return None
    return Fraction(num) / (Fraction(den) if den else 1)


def _last_number(text: str) -> str | None:
    found = None
    for found in _NUMBER.finditer(text[-10_000:]):
        pass
    return found.group(0) if found else None


def verify(response: str, answer: str) -> bool:
    """True iff the response's final number equals ``answer`` exactly."""
    gold = parse_number(answer)
    if gold is None:
        return False
    pred_text = final_answer(response)
    if pred_text is None:
        pred_text = _last_number(response)
    if pred_text is None:
        return False
    pred = parse_number(pred_text)
    return pred is not None and pred == gold
