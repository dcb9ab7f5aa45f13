"""megatron_sdpg.algo."""
