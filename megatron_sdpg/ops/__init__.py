"""megatron_sdpg.ops."""
