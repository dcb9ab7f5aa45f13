"""megatron_sdpg.testing."""
