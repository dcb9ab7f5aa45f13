"""HF <-> Megatron weights: per-family mappings, loading into and exporting from model chunks, converters.

File formats live in :mod:`megatron_sdpg.formats`; the trainer -> engine sync in :mod:`megatron_sdpg.rollout.sync`.
"""

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.weights.llama import LlamaMapping
from megatron_sdpg.weights.mapping_base import FamilyMapping, WeightMappingError
from megatron_sdpg.weights.qwen2 import Qwen2Mapping
from megatron_sdpg.weights.qwen3 import Qwen3Mapping

_FAMILIES = {"llama": LlamaMapping, "qwen2": Qwen2Mapping, "qwen3": Qwen3Mapping}


def mapping_for(cfg: ModelConfig) -> FamilyMapping:
    """The mapping of ``cfg.arch``.

    Raises:
        WeightMappingError: no mapping for this architecture.
    """
    if cfg.arch not in _FAMILIES:
        raise WeightMappingError(f"unsupported architecture {cfg.arch!r}; supported: {sorted(_FAMILIES)}")
    return _FAMILIES[cfg.arch](cfg)


__all__ = ["FamilyMapping", "WeightMappingError", "mapping_for"]
