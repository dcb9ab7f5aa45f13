"""The whole configuration: one typed dataclass per section."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from megatron_sdpg.config.sections import LoggingConfig, TrainConfig
from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.platform.layout import ParallelConfig
from megatron_sdpg.train.step import OptimizerConfig


@dataclass
class SDPGConfig:
    """Every setting of a run. Loaded by :func:`megatron_sdpg.config.load_config`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Validates every section; with ``world_size``, the layout too.

        Raises:
            ConfigError: one line naming the field path.
        """
        from megatron_sdpg.platform.layout import ParallelLayout

        if world_size is not None:
            ParallelLayout.resolve(self.parallel, world_size)
        for f in fields(self):
            section = getattr(self, f.name)
            if f.name == "model":
                section.validate(f.name, tp=self.parallel.tp)
            else:
                section.validate(f.name)
