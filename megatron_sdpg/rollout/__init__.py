"""megatron_sdpg.rollout."""
