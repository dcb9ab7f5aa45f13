"""megatron_sdpg.platform."""
