"""megatron_sdpg.rewards."""
