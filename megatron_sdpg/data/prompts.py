"""Student and teacher prompts through the tokenizer's chat template, and their sequences.

The student prompt is the chat-templated student message; the teacher prompt is the
chat-templated teacher message (the same student message followed by the privileged
block). A sampled response is appended unchanged to both, so the response tokens are
identical in the student sequence ``prompt + response`` and the teacher sequence
``teacher_prompt + response``; only their offsets differ.

Truncation policy (``DataConfig.context_truncation``) when a teacher prompt exceeds
``max_teacher_prompt_tokens``: the question and the answer are never cut; only the
context is, by whole tokens, with ``" [...]"`` marking the cut: ``head`` keeps its
beginning, ``tail`` its end (where a worked solution concludes), ``error`` raises.
If even an empty context does not fit, the teacher prompt drops the context block
(the no-context form of the template, which states the answer) and, if that still
does not fit, loading raises.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.templates import PromptTemplate

ELLIPSIS = " [...]"


class PromptTooLongError(ValueError):
    """A prompt cannot be made to fit its token limit."""


def chat_prompt(tokenizer, user_message: str, **template_kwargs) -> str:
    """The chat-templated text of one user turn, ending with the assistant header.

    ``template_kwargs`` go to the chat template (e.g. ``enable_thinking=False``).
    """
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True, **template_kwargs
    )


def chat_template_kwargs(tokenizer, mode: str) -> dict:
    """Chat-template keywords of ``data.chat_template`` (``model``, ``thinking``, ``no_thinking``).

    Raises:
        ValueError: a thinking mode was asked of a template that ignores ``enable_thinking``,
            or the mode is unknown.
    """
    if mode == "model":
        return {}
    if mode not in ("thinking", "no_thinking"):
        raise ValueError(f"data.chat_template: {mode!r} is not one of ('model', 'thinking', 'no_thinking')")
    template = getattr(tokenizer, "chat_template", None) or ""
    if "enable_thinking" not in (template if isinstance(template, str) else str(template)):
        raise ValueError(f"data.chat_template: {mode!r} needs a chat template that reads enable_thinking "
                         "(e.g. Qwen3's); this tokenizer's does not")
    return {"enable_thinking": mode == "thinking"}


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of already-templated text (no extra special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptBuilder:
    """Builds student and teacher prompt ids for problems.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        template: Renders the user messages.
        max_teacher_prompt_tokens: Teacher prompts longer than this get their context cut.
        context_truncation: ``head``, ``tail`` or ``error`` (module docstring).
        template_kwargs: Chat-template keywords (see ``chat_template_kwargs``).

    Attributes:
        truncations: Teacher prompts built so far whose context was cut to fit (the
            trainer reports the per-step count as ``data/teacher_context_truncated``).
    """

    def __init__(
        self,
        tokenizer,
        template: PromptTemplate,
        max_teacher_prompt_tokens: int = 3072,
        context_truncation: str = "head",
        template_kwargs: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.max_teacher_prompt_tokens = max_teacher_prompt_tokens
        self.context_truncation = context_truncation
        self.template_kwargs = dict(template_kwargs or {})
        self.truncations = 0

    def _chat(self, user_message: str) -> str:
        return chat_prompt(self.tokenizer, user_message, **self.template_kwargs)

    def student_text(self, problem: Problem) -> str:
        """The chat-templated student prompt."""
        return self._chat(self.template.render_student(problem))

    def student_ids(self, problem: Problem) -> list[int]:
        """Token ids of the student prompt."""
        return encode(self.tokenizer, self.student_text(problem))

    def teacher_text(self, problem: Problem) -> str:
        """The chat-templated teacher prompt, its context truncated to fit if needed."""
        return self._teacher(problem)[0]

    def teacher_ids(self, problem: Problem) -> list[int]:
        """Token ids of the teacher prompt."""
        return self._teacher(problem)[1]

    def _teacher(self, problem: Problem) -> tuple[str, list[int]]:
        text = self._chat(self.template.render_teacher(problem))
        ids = encode(self.tokenizer, text)
        excess = len(ids) - self.max_teacher_prompt_tokens
        if excess <= 0:
            return text, ids
        if self.context_truncation == "error" or not problem.context:
            raise PromptTooLongError(
                f"problem {problem.id}: teacher prompt is {excess} tokens over "
                f"max_teacher_prompt_tokens={self.max_teacher_prompt_tokens}"
            )
        text = self._truncated_teacher_text(problem, excess)
        self.truncations += 1
        return text, encode(self.tokenizer, text)

    def _truncated_teacher_text(self, problem: Problem, excess: int) -> str:
        ctx_ids = encode(self.tokenizer, problem.context)
        keep = len(ctx_ids) - excess - len(encode(self.tokenizer, ELLIPSIS))
        while keep > 0:
            kept = ctx_ids[:keep] if self.context_truncation == "head" else ctx_ids[-keep:]
            piece = self.tokenizer.decode(kept)
            context = piece + ELLIPSIS if self.context_truncation == "head" else ELLIPSIS.strip() + " " + piece
            text = self._chat(self.template.render_teacher(problem, context=context))
            over = len(encode(self.tokenizer, text)) - self.max_teacher_prompt_tokens
            if over <= 0:
                return text
            keep -= over
        text = self._chat(self.template.render_teacher(problem, context=""))
        if len(encode(self.tokenizer, text)) > self.max_teacher_prompt_tokens:
            raise PromptTooLongError(
                f"problem {problem.id}: teacher prompt exceeds max_teacher_prompt_tokens="
                f"{self.max_teacher_prompt_tokens} even without its context"
            )
        return text


@dataclass(frozen=True)
class SequencePair:
    """A response placed after the student prompt and after the teacher prompt.

    Attributes:
        student_ids: ``student_prompt + response``, length ``Ls``.
        teacher_ids: ``teacher_prompt + response``, length ``Lt``.
        student_response: ``(start, end)`` of the response in ``student_ids``.
        teacher_response: ``(start, end)`` of the response in ``teacher_ids``.

    ``student_ids[slice(*student_response)] == teacher_ids[slice(*teacher_response)]``.
    The logits predicting response token ``j`` sit at position ``start + j - 1``.
    """

    student_ids: list[int]
    teacher_ids: list[int]
    student_response: tuple[int, int]
    teacher_response: tuple[int, int]


def build_sequence_pair(
    student_prompt_ids: list[int], teacher_prompt_ids: list[int], response_ids: list[int]
) -> SequencePair:
    """Appends the same response tokens to both prompts and records where they lie.

    Args:
        student_prompt_ids: Student prompt, ``[Ps]``.
        teacher_prompt_ids: Teacher prompt, ``[Pt]``.
        response_ids: Sampled response, ``[R]`` (R >= 1).
    """
    if not student_prompt_ids or not teacher_prompt_ids:
        raise ValueError("empty prompt")
    if not response_ids:
        raise ValueError("empty response")
    response = list(response_ids)
    ps, pt, r = len(student_prompt_ids), len(teacher_prompt_ids), len(response)
    return SequencePair(
        student_ids=list(student_prompt_ids) + response,
        teacher_ids=list(teacher_prompt_ids) + response,
        student_response=(ps, ps + r),
        teacher_response=(pt, pt + r),
    )
