"""megatron_sdpg.train."""
