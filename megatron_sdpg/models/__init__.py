"""megatron_sdpg.models."""
