"""megatron_sdpg.config."""
