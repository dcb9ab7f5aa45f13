"""Reward configuration: which verifier, what rewards, and how calls are bounded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_sdpg.config.errors import require
from megatron_sdpg.rewards.registry import verifier_path


@dataclass
class RewardConfig:
    """The ``reward`` config section.

    Attributes:
        verifier: Built-in name (``math``, ``exact_match``, ``numeric``, ``worked_sum``) or a plugin path
            ``package.module:function``; empty means the task's default verifier.
        correct_reward: Reward of a verified response (paper: 1).
        wrong_reward: Reward of a rejected response (paper: 0; authors' scripts: -1).
        failure_reward: Reward when the verifier times out or raises; None = wrong_reward.
        timeout_s: Wall-clock limit of one verifier call; the worker is killed past it.
        workers: Worker processes of the verifier pool.
        max_response_chars: Longer responses are cut to their last this-many characters
            before verification (the final answer is at the end).
    """

    verifier: str = ""
    correct_reward: float = 1.0
    wrong_reward: float = 0.0
    failure_reward: Optional[float] = None
    timeout_s: float = 5.0
    workers: int = 2
    max_response_chars: int = 20_000

    def validate(self, prefix: str) -> None:
        """Raises ConfigError naming ``prefix.field`` for the first bad value."""
        if self.verifier:
            try:
                verifier_path(self.verifier)
            except ValueError as err:
                require(False, f"{prefix}.verifier", str(err))
        for name in ("correct_reward", "wrong_reward", "failure_reward"):
            value = getattr(self, name)
            require(value is None or math.isfinite(value), f"{prefix}.{name}", f"must be finite, got {value}")
        require(
            self.correct_reward > self.wrong_reward,
            f"{prefix}.correct_reward",
            f"must exceed wrong_reward ({self.correct_reward} <= {self.wrong_reward})",
        )
        require(self.timeout_s > 0, f"{prefix}.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.workers >= 1, f"{prefix}.workers", f"must be >= 1, got {self.workers}")
        require(self.max_response_chars >= 1, f"{prefix}.max_response_chars", "must be >= 1")

    @property
    def reward_on_failure(self) -> float:
        """The reward given when a verifier call times out or raises."""
        return self.wrong_reward if self.failure_reward is None else self.failure_reward
