"""Exact-match verifier: the final answer string equals the reference after light normalisation.

The final answer is the last ``\\boxed{}`` content, else the text after ``####``,
else the whole response. Both sides are stripped of surrounding whitespace, ``$``
and a trailing period, inner whitespace runs collapse to one space, and the
comparison ignores case.
"""

from __future__ import annotations

from megatron_sdpg.rewards.extract import final_answer


def normalize(text: str) -> str:
    """Whitespace-collapsed, case-folded text without surrounding ``$`` or final period."""
    s = " ".join(text.split()).strip().strip("$").strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s.casefold()


def verify(response: str, answer: str) -> bool:
    """True iff the normalised final answer equals the normalised reference."""
    pred = final_answer(response)
    if pred is None:
        pred = response
    return normalize(pred) == normalize(answer)
