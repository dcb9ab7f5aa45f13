"""Colocated-engine memory and busy flushes on a real CPU server (127.0.0.1, real process).

* ``/release_memory_occupation`` frees the weights: the server's resident memory, read by
  this test from ``/proc/<pid>/statm``, falls by most of the parameter bytes; generation
  and weight updates are refused until ``/resume_memory_occupation``; after resume and a
  tensor-push sync the log-probs match a float64 dense forward of the new weights.
* ``/flush_cache`` answers 400 while a ``/generate`` runs (as SGLang does); the client asks
  again until the engine is idle, or raises ``EngineTimeoutError`` at its timeout.
"""

from __future__ import annotations

import pytest

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.config import SamplingConfig
from megatron_sdpg.rollout.protocol import EngineTimeoutError, RequestRejectedError
from megatron_sdpg.rollout.server.memory import resident_bytes
from megatron_sdpg.testing.rollout import random_like_state, reference_logprobs, start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model
from megatron_sdpg.rollout.sync import TensorPushSync, WeightSyncError

TOL = 1e-4
BUSY_TOKENS = 400  # decoding them keeps the engine busy for seconds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_memory")
    # ~21 MB of fp32 parameters: large enough that their pages show in the resident set.
    hf_dir = build_tiny_llama(str(root / "tiny"), vocab_size=8192, hidden=256)
    engine = start_cpu_server(hf_dir, str(root / "logs"))
    client = RolloutClient([engine.url], max_retries=0, request_timeout_s=120.0)
    try:
        yield client, engine, hf_dir
    finally:
        client.close()
        engine.stop()


def test_release_frees_the_weights_and_resume_then_sync_restores_them(setup):
    client, engine, hf_dir = setup
    model = load_hf_model(hf_dir)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    # The server maps its checkpoint lazily: pages of embedding rows never used are not resident
    # and freeing them frees nothing. A sync writes every parameter, so all of them are resident.
    TensorPushSync(client).sync(iter(model.state_dict().items()), version="start")

    for cycle in range(2):
        before = resident_bytes(engine.pid)
        [answer] = client.run(client.aclient.release_memory_occupation())
        released = resident_bytes(engine.pid)
        assert answer["freed_bytes"] == param_bytes
        assert before - released >= 0.8 * param_bytes, (cycle, before, released, param_bytes)
        with pytest.raises(RequestRejectedError, match="weights are released"):
            client.generate([[2, 5, 6]], n=1, sampling=greedy)
        with pytest.raises(WeightSyncError, match="weights are released"):
            TensorPushSync(client).sync(iter(model.state_dict().items()), version=f"refused{cycle}")

        [answer] = client.run(client.aclient.resume_memory_occupation())
        assert answer["allocated_bytes"] == param_bytes
        assert resident_bytes(engine.pid) - released >= 0.8 * param_bytes

        state = random_like_state(model, seed=10 + cycle)
        model.load_state_dict(state)
        TensorPushSync(client, bucket_bytes=4 << 20).sync(iter(state.items()), version=f"c{cycle}")
        sampling = SamplingConfig(temperature=0.9, max_new_tokens=5, seed=3, ignore_eos=True)
        [[s]], _ = client.generate([[2, 40, 41]], n=1, sampling=sampling)
        assert s.weight_version == f"c{cycle}"
        _, ref = reference_logprobs(model, s.prompt_ids, s.output_ids, 0.9)
        assert max(abs(a - b) for a, b in zip(s.logprobs, ref)) <= TOL


def test_release_rejects_unknown_tags(setup):
    client, _, _ = setup
    with pytest.raises(RequestRejectedError, match="tags"):
        client.run(client.aclient.release_memory_occupation(["gpu"]))


def _busy_generate(client):
    """A /generate that keeps the engine busy for a while (many tokens, no early stop)."""
    long = SamplingConfig(temperature=1.0, max_new_tokens=BUSY_TOKENS, ignore_eos=True, seed=1)
    return client.submit(client.aclient.generate([[2, 5, 6]], long, n=1))


def _wait_until_busy(client, url, attempts=2000):
    """Polls /flush_cache until the engine answers 400 (busy); returns that answer's message."""
    for _ in range(attempts):
        try:
            client.run(client.aclient.call(url, "POST", "/flush_cache", want_json=False))
        except RequestRejectedError as e:
            return str(e)
    raise AssertionError("the engine never answered /flush_cache with 400 while a /generate ran")


def test_flush_cache_waits_until_the_running_generate_is_done(setup):
    client, engine, _ = setup
    running = _busy_generate(client)
    message = _wait_until_busy(client, engine.url)
    assert "HTTP 400" in message and "in progress" in message
    # Asked while busy (400), so it can only return by asking again until the engine, idle, answers 200.
    client.run(client.aclient.flush_cache(timeout_s=300.0))
    groups, _ = running.result(timeout=60)
    assert len(groups[0][0].output_ids) == BUSY_TOKENS


def test_flush_cache_gives_up_at_its_timeout(setup):
    client, engine, _ = setup
    running = _busy_generate(client)
    _wait_until_busy(client, engine.url)
    with pytest.raises(EngineTimeoutError, match="still busy"):
        client.run(client.aclient.flush_cache(timeout_s=0.05))  # far shorter than the busy stretch
    running.result()
    client.run(client.aclient.flush_cache(timeout_s=60.0))  # idle again: one call
