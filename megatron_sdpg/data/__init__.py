"""megatron_sdpg.data: tasks, problem files, prompt templates and builders, the prompt source.

Public interface used by the trainer: ``Problem``, ``DataConfig``, ``build_task``,
``build_prompt_builder``, ``build_prompt_source``, ``PromptBuilder`` (student / teacher
prompt ids), ``build_sequence_pair`` and ``PromptSource`` (``state_dict`` for checkpoints).
"""

from megatron_sdpg.data.build import build_prompt_builder, build_prompt_source
from megatron_sdpg.data.config import DataConfig
from megatron_sdpg.data.problem import Problem
from megatron_sdpg.data.prompts import PromptBuilder, SequencePair, build_sequence_pair
from megatron_sdpg.data.source import PromptSource
from megatron_sdpg.data.tasks import build_task, get_task

__all__ = [
    "DataConfig", "Problem", "PromptBuilder", "PromptSource", "SequencePair", "build_prompt_builder",
    "build_prompt_source", "build_sequence_pair", "build_task", "get_task",
]
