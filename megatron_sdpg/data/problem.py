"""The unit of training data: one prompt with its answer and privileged context."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One prompt of a task.

    Attributes:
        id: Stable identifier (file and row for datasets, split and index for tasks).
        question: What the student sees (the user message before templating).
        answer: The reference final answer the verifier compares against.
        context: Privileged context for the teacher prompt: a worked solution or
            hints. May be empty; templates then show the answer alone.
    """

    id: str
    question: str
    answer: str
    context: str = ""
