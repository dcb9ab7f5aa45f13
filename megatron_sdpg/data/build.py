"""Everything the trainer needs from a ``DataConfig``, built in one place.

Usage (trainer start-up)::

    builder = build_prompt_builder(tokenizer, cfg.data)
    task = build_task(cfg.data, prompt_length=lambda p: len(builder.student_ids(p)))
    source = build_prompt_source(task, cfg.data, batch_size=cfg.rollout.prompts_per_step)
    for problems in source: ...   # source.state_dict() goes into checkpoints
"""

from __future__ import annotations

from megatron_sdpg.data.config import DataConfig
from megatron_sdpg.data.prompts import PromptBuilder, chat_template_kwargs
from megatron_sdpg.data.source import PromptSource
from megatron_sdpg.data.templates import get_template


def build_prompt_builder(tokenizer, cfg: DataConfig) -> PromptBuilder:
    """The student / teacher prompt builder for the configured template and limits."""
    template = get_template(cfg.template, cfg.student_template, cfg.teacher_template)
    kwargs = chat_template_kwargs(tokenizer, cfg.chat_template)
    return PromptBuilder(tokenizer, template, cfg.max_teacher_prompt_tokens, cfg.context_truncation, kwargs)


def build_prompt_source(task, cfg: DataConfig, batch_size: int) -> PromptSource:
    """The seeded, resumable source of training problems (``train_size`` of a generated task)."""
    problems = task.problems("train", cfg.train_size if task.generated else None, seed=cfg.seed)
    return PromptSource(problems, batch_size, seed=cfg.seed, shuffle=cfg.shuffle)
