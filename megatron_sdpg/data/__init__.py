"""megatron_sdpg.data."""
