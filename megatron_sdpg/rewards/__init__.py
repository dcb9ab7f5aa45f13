"""megatron_sdpg.rewards: one verifier per module, the registry, and the timeout pool.

Public interface: ``RewardConfig``, ``VerifierPool(verifier, config).score(responses,
answers) -> RewardBatch``, ``resolve_verifier(spec)``.
"""

from megatron_sdpg.rewards.config import RewardConfig
from megatron_sdpg.rewards.pool import RewardBatch, VerifierPool
from megatron_sdpg.rewards.registry import BUILTIN_VERIFIERS, resolve_verifier

__all__ = ["BUILTIN_VERIFIERS", "RewardBatch", "RewardConfig", "VerifierPool", "resolve_verifier"]
