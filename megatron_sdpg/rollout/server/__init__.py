"""A CPU rollout server that speaks the subset of SGLang's HTTP API our client uses.

For CPU/laptop runs and tests only, NOT for production: it runs a ``transformers``
model with static batching (a batch runs to completion before the next starts)
and a per-batch KV cache. Production rollouts use SGLang on GPUs.

Start it with ``python -m megatron_sdpg.rollout.server --hf-dir DIR --port P``.
"""
