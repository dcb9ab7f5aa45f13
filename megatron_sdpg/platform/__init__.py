"""Platform layer: CPU redirect for megatron-core, distributed start-up, parallel layout."""

from megatron_sdpg.platform.layout import ParallelConfig, ParallelLayout

__all__ = ["ParallelConfig", "ParallelLayout"]
