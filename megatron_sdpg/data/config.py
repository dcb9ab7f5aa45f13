"""Data configuration: which task or files, which columns, which prompt template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_sdpg.config.errors import require
from megatron_sdpg.data.templates import BUILTIN_TEMPLATES, check_custom_template

CONTEXT_TRUNCATION = ("head", "tail", "error")
CHAT_TEMPLATES = ("model", "thinking", "no_thinking")


@dataclass
class DataConfig:
    """The ``data`` config section.

    Attributes:
        task: A registered task (``synthetic``) or ``files`` (rows from jsonl/parquet).
        task_options: Options of the task (e.g. ``{terms: 3, digits: 2}`` for synthetic).
        train_size: Problems drawn for training by generated tasks (ignored for files).
        train_files: jsonl/parquet files of the training split (``files`` task).
        eval_files: jsonl/parquet files of the held-out split (``files`` task).
        question_key: Column with the prompt.
        answer_key: Column with the reference answer.
        context_key: Column with the privileged context (worked solution); "" for none.
        id_key: Column with a row id; "" to use ``file:row``.
        context_marker: If set (e.g. ``[TEACHER_CONTEXT_TOKEN]``), the question column is
            split at its first occurrence: before = student prompt, after = context.
        max_prompt_tokens: Rows whose templated student prompt is longer are bad rows.
        max_teacher_prompt_tokens: Teacher prompts longer than this have their context
            truncated (see ``context_truncation``).
        context_truncation: ``head`` keeps the start of the context, ``tail`` its end,
            ``error`` raises.
        skip_bad_rows: Skip and count bad rows instead of failing on the first one.
        template: ``paper`` (default), ``opsd``, ``hint`` or ``custom``.
        chat_template: How the tokenizer's own chat template is applied: ``model`` as
            it comes, ``thinking`` / ``no_thinking`` with ``enable_thinking`` true / false
            (Qwen3's thinking mode; the template must read ``enable_thinking``).
        student_template: Custom student message (``{question}``, ``{answer}``, ``{context}``).
        teacher_template: Custom privileged block appended to the student message.
        seed: Seed of the training order (and of generated training problems).
        shuffle: Shuffle the training problems every epoch.
    """

    task: str = "synthetic"
    task_options: dict[str, Any] = field(default_factory=dict)
    train_size: int = 100_000
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    question_key: str = "question"
    answer_key: str = "answer"
    context_key: str = "solution"
    id_key: str = ""
    context_marker: str = ""
    max_prompt_tokens: int = 1024
    max_teacher_prompt_tokens: int = 3072
    context_truncation: str = "head"
    skip_bad_rows: bool = False
    template: str = "paper"
    chat_template: str = "model"
    student_template: str = ""
    teacher_template: str = ""
    seed: int = 0
    shuffle: bool = True

    def validate(self, prefix: str) -> None:
        """Raises ConfigError naming ``prefix.field`` for the first bad value."""
        from megatron_sdpg.data.tasks import TASK_NAMES

        require(self.task in TASK_NAMES, f"{prefix}.task", f"unknown task {self.task!r}; choose from {sorted(TASK_NAMES)}")
        if self.task != "files":
            from megatron_sdpg.data.tasks import get_task

            try:  # builds nothing but the options
                get_task(self.task, **dict(self.task_options))
            except (TypeError, ValueError) as err:
                require(False, f"{prefix}.task_options", str(err).splitlines()[0])
        if self.task == "files":
            require(bool(self.train_files), f"{prefix}.train_files", "the files task needs at least one training file")
            for name in ("train_files", "eval_files"):
                for path in getattr(self, name):
                    require(
                        path.endswith((".jsonl", ".json", ".parquet")),
                        f"{prefix}.{name}",
                        f"{path!r} is neither .jsonl/.json nor .parquet",
                    )
            require(bool(self.eval_files), f"{prefix}.eval_files",
                    "the files task needs at least one held-out file (train.eval_n problems are evaluated)")
            require(bool(self.question_key), f"{prefix}.question_key", "must not be empty")
            require(bool(self.answer_key), f"{prefix}.answer_key", "must not be empty")
        require(self.train_size >= 1, f"{prefix}.train_size", f"must be >= 1, got {self.train_size}")
        require(self.max_prompt_tokens >= 1, f"{prefix}.max_prompt_tokens", "must be >= 1")
        require(
            self.max_teacher_prompt_tokens >= self.max_prompt_tokens,
            f"{prefix}.max_teacher_prompt_tokens",
            f"must be >= max_prompt_tokens ({self.max_prompt_tokens})",
        )
        require(
            self.context_truncation in CONTEXT_TRUNCATION,
            f"{prefix}.context_truncation",
            f"{self.context_truncation!r} is not one of {CONTEXT_TRUNCATION}",
        )
        require(
            self.chat_template in CHAT_TEMPLATES,
            f"{prefix}.chat_template",
            f"{self.chat_template!r} is not one of {CHAT_TEMPLATES}",
        )
        choices = sorted(BUILTIN_TEMPLATES) + ["custom"]
        require(self.template in choices, f"{prefix}.template", f"{self.template!r} is not one of {choices}")
        if self.template == "custom":
            for name in ("student_template", "teacher_template"):
                fmt = getattr(self, name)
                problem = check_custom_template(fmt) if fmt else "empty (template=custom needs both)"
                require(problem is None, f"{prefix}.{name}", str(problem))
