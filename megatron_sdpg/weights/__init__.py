"""megatron_sdpg.weights."""
