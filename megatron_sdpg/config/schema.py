"""The whole configuration: one typed dataclass per section."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from megatron_sdpg.algo.config import AlgorithmConfig
from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.config.sections import CheckpointConfig, LoggingConfig, TrainConfig
from megatron_sdpg.data.config import DataConfig
from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.platform.layout import ParallelConfig
from megatron_sdpg.rewards.config import RewardConfig
from megatron_sdpg.rollout.config import OFF_POLICY_TIS_CAP, RolloutConfig
from megatron_sdpg.train.step import OptimizerConfig


@dataclass
class SDPGConfig:
    """Every setting of a run. Loaded by :func:`megatron_sdpg.config.load_config`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Validates every section; with ``world_size``, the layout too.

        Raises:
            ConfigError: one line naming the field path.
        """
        from megatron_sdpg.platform.layout import ParallelLayout

        _require_finite(self, "")
        self.parallel.validate("parallel")  # first: the model's checks divide by tp and pp
        if world_size is not None:
            ParallelLayout.resolve(self.parallel, world_size)
        for f in fields(self):
            section = getattr(self, f.name)
            if f.name == "model":
                section.validate(f.name, tp=self.parallel.tp)
            else:
                section.validate(f.name)
        self._validate_across_sections()

    def fill_derived(self) -> None:
        """Fills fields whose default is "the same as another section's"."""
        if self.algorithm.total_steps is None:
            self.algorithm.total_steps = self.train.steps
        if self.algorithm.temperature is None:
            self.algorithm.temperature = self.rollout.sampling.temperature or 1.0
        if not self.rollout.model_path and self.model.hf_dir:
            self.rollout.model_path = self.model.hf_dir
        if self.rollout.off_policy_steps and self.algorithm.tis_cap is None:
            # One step stale samples: the policy gradient is weighted by min(pi_old / pi_rollout, cap).
            self.algorithm.tis_cap = OFF_POLICY_TIS_CAP
        if self.algorithm.reward_scheme == "plus_minus_one" and self.reward.wrong_reward == 0.0:
            self.reward.wrong_reward = -1.0  # the scheme's value unless the user chose another

    def fused_output_off_reason(self) -> str | None:
        """Why ``algorithm.fused_output`` cannot be used with this config (one line), or None.

        The trainer then takes the logits path and logs the line; the planner plans that path.
        """
        if self.algorithm.fused_output and self.parallel.sequence_parallel:
            return ("algorithm.fused_output is on but parallel.sequence_parallel splits the hidden states over "
                    "TP, which ops/fused_output does not take: using the logits path")
        return None

    def _validate_across_sections(self) -> None:
        """Settings that two sections must agree on."""
        algo, sampling = self.algorithm, self.rollout.sampling
        expected = {"zero_one": (1.0, 0.0), "plus_minus_one": (1.0, -1.0)}[algo.reward_scheme]
        if (self.reward.correct_reward, self.reward.wrong_reward) != expected:
            raise ConfigError("reward.wrong_reward", f"rewards ({self.reward.correct_reward}, {self.reward.wrong_reward}) "
                              f"contradict algorithm.reward_scheme={algo.reward_scheme} {expected}")
        if sampling.temperature > 0 and abs(algo.temperature - sampling.temperature) > 1e-12:
            raise ConfigError("algorithm.temperature", f"{algo.temperature} differs from rollout.sampling.temperature "
                              f"{sampling.temperature}: training log-probs must use the sampling temperature")


def _require_finite(obj, prefix: str) -> None:
    """Refuses a NaN or infinite number anywhere in the configuration (no setting means one)."""
    import dataclasses
    import math

    items = ((f.name, getattr(obj, f.name)) for f in fields(obj)) if dataclasses.is_dataclass(obj) else (
        obj.items() if isinstance(obj, dict) else enumerate(obj))
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(path, f"must be a finite number, got {value}")
        if dataclasses.is_dataclass(value) or isinstance(value, (dict, list, tuple)):
            _require_finite(value, path)
