"""Task registry: a task turns a split name into problems and names its verifier.

A task has ``name``, ``default_verifier``, ``generated`` (True when problems are drawn
from a generator and a size must be given), ``describe() -> dict`` and
``problems(split, n, seed) -> list[Problem]`` with splits ``train`` and ``heldout``.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.tasks.files import FilesTask
from megatron_sdpg.data.tasks.synthetic import SyntheticTask
from megatron_sdpg.data.tasks.synthetic_long import SyntheticLongTask

GENERATED_TASKS = {"synthetic": SyntheticTask, "synthetic-long": SyntheticLongTask}
TASK_NAMES = set(GENERATED_TASKS) | {"files"}


def parse_task_options(items: list[str]) -> dict:
    """``--task-option KEY=VALUE`` items as a dict (each value parsed as JSON, else kept as text).

    Raises:
        ValueError: An item without ``=``, named.
    """
    import json

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def get_task(name: str, **options):
    """A generated task by name, built with its options (e.g. ``terms=3``)."""
    if name not in GENERATED_TASKS:
        raise ValueError(f"unknown generated task {name!r}; choose from {sorted(GENERATED_TASKS)}")
    return GENERATED_TASKS[name](**options)


def build_task(config, prompt_length: Callable[[Problem], int] | None = None):
    """The task a ``DataConfig`` names.

    Args:
        config: A validated ``DataConfig``.
        prompt_length: Token count of a problem's student prompt; the ``files`` task
            turns rows longer than ``config.max_prompt_tokens`` into bad rows.
    """
    if config.task == "files":
        from megatron_sdpg.data.files import Columns

        columns = Columns(
            question=config.question_key,
            answer=config.answer_key,
            context=config.context_key,
            id=config.id_key,
            context_marker=config.context_marker,
        )
        return FilesTask(
            config.train_files,
            config.eval_files,
            columns,
            skip_bad_rows=config.skip_bad_rows,
            prompt_length=prompt_length,
            max_prompt_tokens=config.max_prompt_tokens,
        )
    return get_task(config.task, **dict(config.task_options))
