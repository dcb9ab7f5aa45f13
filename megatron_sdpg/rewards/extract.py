"""Final-answer extraction shared by the verifiers (pure string code, no regex backtracking)."""

from __future__ import annotations


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced.

    Returns None when there is no box or the last one is not closed.
    Example: ``last_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"``.
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


def after_hashes(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K style), or None."""
    pos = text.rfind("####")
    if pos < 0:
        return None
    return text[pos + 4 :].split("\n", 1)[0].strip()


def final_answer(text: str) -> str | None:
    """The boxed answer if any, else the ``####`` answer, else None."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else after_hashes(text)
