"""The distributed weight sync from a trainer started by ``torchrun`` (issue 15).

torchrun sets ``TORCHELASTIC_USE_AGENT_STORE=True`` in every worker, and torch's
``rendezvous("tcp://...")`` then makes even rank 0 a *client* of a store that
nobody hosts: the trainer and the engines both waited for the rendezvous
timeout, on the local Slurm cluster, while every test outside torchrun passed.
The trainer (rank 0 of the weight-update group) must host the store itself.
"""

from __future__ import annotations

import os

import pytest

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.testing.distributed import free_port, run_single
from megatron_sdpg.testing.rollout import random_like_state, start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model
from megatron_sdpg.rollout.sync import NcclBroadcastSync


def _sync_as_torchrun_worker(rank, world_size, url, state, port):
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # what torchrun sets in its workers
    client = RolloutClient([url], max_retries=0, request_timeout_s=60.0)
    sync = NcclBroadcastSync(client, "127.0.0.1", port, backend="gloo", timeout_s=20.0)
    try:
        return sync.sync(iter(state.items()), version=3)
    finally:
        sync.close()
        client.close()


@pytest.mark.timeout(240)
def test_distributed_sync_from_a_torchrun_worker(tmp_path):
    hf_dir = build_tiny_llama(str(tmp_path / "tiny"))
    engine = start_cpu_server(hf_dir, str(tmp_path / "logs"))
    try:
        state = random_like_state(load_hf_model(hf_dir), seed=3)
        metrics = run_single(_sync_as_torchrun_worker, engine.url, state, free_port(), timeout=180)
        assert metrics["sync/bytes"] == sum(t.numel() * t.element_size() for t in state.values())
        client = RolloutClient([engine.url], max_retries=0)
        try:
            assert client.run(client.aclient.model_info(engine.url))["weight_version"] == "3"
        finally:
            client.close()
    finally:
        engine.stop()
