"""User-message templates for student and teacher prompts.

A template turns a :class:`Problem` into the *user message*; the tokenizer's chat
template turns that into tokens (see ``prompts.py``). The teacher message is always
the student message followed by the privileged block, so the two prompts differ only
by the context the teacher is given.

Built-in templates:

* ``paper`` (default): SDPG paper, Fig. 4. The teacher block states the answer and,
  when the problem has a context, "A common way to solve this is: {context}", then
  the paper's instruction to derive it another way without mentioning the hint.
* ``opsd``: the teacher prompt of OPSD (Zhao et al., 2026, Fig. 2), paraphrased: the
  reference solution between markers, then "solve it with your own approach".
  Without a context the answer stands in for the solution.
* ``compact``: the paper's hint without its instructions, for tiny models on CPU where
  every prompt token costs: the student message is the bare question and the teacher
  block "[Hint] The correct answer is {answer}. {context}" (4-5x shorter prompts).
* ``context_only``: like ``compact`` but the teacher block is "[Hint] {context}" and
  does not state the answer (for contexts that are hints, such as the synthetic
  task's carries, when the teacher must not be able to copy the answer). Without a
  context it falls back to the answer.

Custom templates come from config as ``str.format`` strings with the fields
``{question}``, ``{answer}`` and ``{context}``: ``student`` renders the student
message and ``teacher_block`` the privileged block appended to it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from megatron_sdpg.data.problem import Problem

_PAPER_STUDENT = (
    "Solve the following math problem step by step. Present your final answer inside "
    "\\boxed{{}}, for example \\boxed{{42}}.\n{question}\n"
    "Remember to put your final answer inside \\boxed{{}}."
)
_PAPER_INSTRUCTION = (
    "[Instruction] If possible, derive the answer {answer} using an alternative, equally "
    "rigorous mathematical approach (e.g., algebraic vs geometric, or different "
    "substitution). If no alternative exists, articulate the standard approach with "
    "exceptional clarity. Do NOT state that you were given the answer or reference."
)
_PAPER_TEACHER = (
    "[Hint] The correct answer is {answer}. A common way to solve this is:\n{context}\n"
    + _PAPER_INSTRUCTION
)
_PAPER_TEACHER_NO_CONTEXT = "[Hint] The correct answer is {answer}.\n" + _PAPER_INSTRUCTION

_OPSD_STUDENT = (
    "Problem: {question}\n\nPlease reason step by step, and put your final answer "
    "within \\boxed{{}}."
)
_OPSD_TEACHER = (
    "Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
    "{context}\n=== Reference Solution End ===\nAfter understanding the reference "
    "solution, please try to solve this problem using your own approach below:"
)
_OPSD_TEACHER_NO_CONTEXT = _OPSD_TEACHER.replace("{context}", "The answer is {answer}.")

_COMPACT_STUDENT = "{question}"
_COMPACT_TEACHER = "[Hint] The correct answer is {answer}. {context}"
_COMPACT_TEACHER_NO_CONTEXT = "[Hint] The correct answer is {answer}."
_CONTEXT_ONLY_TEACHER = "[Hint] {context}"

_FIELDS = {"question", "answer", "context"}


@dataclass(frozen=True)
class PromptTemplate:
    """Renders student and teacher user messages.

    Attributes:
        name: Template name (for logs and model metadata).
        student: Format string of the student message.
        teacher_block: Format string of the privileged block (problem has a context).
        teacher_block_no_context: The block used when the problem's context is empty.
        separator: Text between the student message and the privileged block.
    """

    name: str
    student: str
    teacher_block: str
    teacher_block_no_context: str
    separator: str = "\n"

    def render_student(self, problem: Problem) -> str:
        """The student user message."""
        return self.student.format(**_fields(problem))

    def render_teacher(self, problem: Problem, context: str | None = None) -> str:
        """The teacher user message: student message + separator + privileged block.

        Args:
            problem: The problem.
            context: Overrides ``problem.context`` (used to truncate long contexts).
        """
        ctx = problem.context if context is None else context
        block = self.teacher_block if ctx else self.teacher_block_no_context
        fields = _fields(problem) | {"context": ctx}
        return self.render_student(problem) + self.separator + block.format(**fields)


def _fields(problem: Problem) -> dict[str, str]:
    return {"question": problem.question, "answer": problem.answer, "context": problem.context}


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    "paper": PromptTemplate("paper", _PAPER_STUDENT, _PAPER_TEACHER, _PAPER_TEACHER_NO_CONTEXT),
    "opsd": PromptTemplate(
        "opsd", _OPSD_STUDENT, _OPSD_TEACHER, _OPSD_TEACHER_NO_CONTEXT, separator="\n\n"
    ),
    "compact": PromptTemplate("compact", _COMPACT_STUDENT, _COMPACT_TEACHER, _COMPACT_TEACHER_NO_CONTEXT),
    "context_only": PromptTemplate(
        "context_only", _COMPACT_STUDENT, _CONTEXT_ONLY_TEACHER, _COMPACT_TEACHER_NO_CONTEXT
    ),
}


def template_fields(fmt: str) -> set[str]:
    """The ``{field}`` names used by a format string (raises ValueError if malformed)."""
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}


def check_custom_template(fmt: str) -> str | None:
    """Returns a one-line problem with a custom format string, or None if it is usable."""
    try:
        used = template_fields(fmt)
    except ValueError as err:
        return f"malformed format string ({err})"
    unknown = used - _FIELDS
    if unknown:
        return f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}"
    try:  # conversions and format specs are checked only when rendering
        fmt.format(**{name: "x" for name in _FIELDS})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as err:
        return f"cannot be rendered ({type(err).__name__}: {err})"
    return None


def get_template(name: str, student: str = "", teacher_block: str = "") -> PromptTemplate:
    """A built-in template by name, or ``custom`` from the two format strings.

    Raises:
        ValueError: unknown name, or a custom template with bad fields.
    """
    if name != "custom":
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(f"unknown template {name!r}; choose from {sorted(BUILTIN_TEMPLATES)} or 'custom'")
        return BUILTIN_TEMPLATES[name]
    for label, fmt in (("student", student), ("teacher_block", teacher_block)):
        problem = check_custom_template(fmt) if fmt else "empty"
        if problem:
            raise ValueError(f"custom template {label}: {problem}")
    return PromptTemplate("custom", student, teacher_block, teacher_block)
