"""Weight sync to a real CPU server by disk, tensor push and the gloo "distributed" flow.

After each sync the server's log-probs (prompt and sampled tokens) must match a
float64 dense forward of a local model holding the new weights (max |Δ| <= 1e-4),
and every engine must report the new weight version. A wrong tensor must be
caught by the post-sync probe check.
"""

from __future__ import annotations

import socket

import pytest
import torch

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.config import SamplingConfig
from megatron_sdpg.rollout.protocol import RequestRejectedError, StreamedBody
from megatron_sdpg.testing.distributed import free_port, run_single
from megatron_sdpg.testing.rollout import random_like_state, reference_logprobs, start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model
from megatron_sdpg.formats.safetensors_stream import SafetensorsStream
from megatron_sdpg.rollout.sync import (
    DiskSync,
    NcclBroadcastSync,
    ProbeCheck,
    TensorPushSync,
    WeightSyncError,
    WeightSyncMismatchError,
)

TOL = 1e-4
PROBE = [2, 17, 33, 4, 99, 5, 63, 8, 21]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_sync")
    hf_dir = build_tiny_llama(str(root / "tiny"))
    engine = start_cpu_server(hf_dir, str(root / "logs"))
    client = RolloutClient([engine.url], max_retries=0, request_timeout_s=120.0)
    try:
        yield client, hf_dir, root
    finally:
        client.close()
        engine.stop()


def _model_with(hf_dir, state):
    model = load_hf_model(hf_dir)
    model.load_state_dict(state)
    return model


def _probe(model, threshold=TOL) -> ProbeCheck:
    ref, _ = reference_logprobs(model, PROBE, [])
    return ProbeCheck(PROBE, ref, threshold)


def _assert_engine_matches(client, model, version):
    sampling = SamplingConfig(temperature=0.9, max_new_tokens=6, seed=5, ignore_eos=True)
    groups, _ = client.generate([[2, 40, 41], [2, 7]], n=2, sampling=sampling)
    for s in (s for g in groups for s in g):
        assert s.weight_version == version
        _, ref = reference_logprobs(model, s.prompt_ids, s.output_ids, 0.9)
        assert max(abs(a - b) for a, b in zip(s.logprobs, ref)) <= TOL


def test_disk_sync(setup):
    client, hf_dir, root = setup
    state = random_like_state(load_hf_model(hf_dir), seed=1)
    model = _model_with(hf_dir, state)
    sync = DiskSync(client, str(root / "sync"), config_dir=hf_dir, shard_bytes=64 * 1024, keep_last=1)
    metrics = sync.sync(iter(state.items()), version=1, probe=_probe(model))
    assert metrics["sync/probe_max_abs_diff"] <= TOL and metrics["sync/shards"] > 1
    assert metrics["sync/bytes"] == sum(t.numel() * 4 for t in state.values())
    _assert_engine_matches(client, model, "1")
    sync.sync(iter(state.items()), version=2)
    assert sorted(p.name for p in (root / "sync").iterdir()) == ["v2"]  # old version removed, no temp dirs


def test_tensor_push_sync_in_buckets(setup):
    client, hf_dir, _ = setup
    state = random_like_state(load_hf_model(hf_dir), seed=2)
    model = _model_with(hf_dir, state)
    bf16_names = [n for n in state if n.endswith("mlp.down_proj.weight")]
    for n in bf16_names:  # mixed dtypes travel as-is; the server casts to its fp32 parameters
        state[n] = state[n].to(torch.bfloat16)
        model.state_dict()[n].copy_(state[n].float())
    sync = TensorPushSync(client, bucket_bytes=20_000)
    metrics = sync.sync(iter(state.items()), version="v3", probe=_probe(model))
    assert metrics["sync/buckets"] >= 4 and metrics["sync/probe_max_abs_diff"] <= TOL
    _assert_engine_matches(client, model, "v3")


def test_wrong_tensor_is_caught_by_the_probe(setup):
    client, hf_dir, _ = setup
    state = random_like_state(load_hf_model(hf_dir), seed=3)
    good = _model_with(hf_dir, state)
    wrong = dict(state)
    name = "model.layers.1.self_attn.o_proj.weight"
    wrong[name] = state[name].t().contiguous()  # a transposed weight: right shape, wrong values
    with pytest.raises(WeightSyncMismatchError, match=r"post-sync check failed on http://127\.0\.0\.1:\d+: max"):
        TensorPushSync(client, bucket_bytes=1 << 20).sync(iter(wrong.items()), version=4, probe=_probe(good))


def test_rejected_tensor_names_the_weight(setup):
    client, hf_dir, _ = setup
    with pytest.raises(WeightSyncError, match=r"model\.embed_tokens\.weight.*shape \(3, 3\)"):
        TensorPushSync(client).sync(iter([("model.embed_tokens.weight", torch.zeros(3, 3))]), version=5)
    with pytest.raises(WeightSyncError, match=r"'model\.nope' is not a parameter"):
        TensorPushSync(client).sync(iter([("model.nope", torch.zeros(3))]), version=5)


def _distributed_sync_rank(rank, world_size, url, state, probe, port):
    """The trainer side, as a real torch.distributed rank (its own default gloo group)."""
    client = RolloutClient([url], max_retries=0, request_timeout_s=120.0)
    sync = NcclBroadcastSync(client, "127.0.0.1", port, backend="gloo", bucket_bytes=30_000, timeout_s=60.0)
    try:
        metrics = sync.sync(iter(state.items()), version=6, probe=probe)
        metrics2 = sync.sync(iter(state.items()), version=7)  # the group is reused
    finally:
        sync.close()
        client.close()
    return metrics, metrics2


def test_distributed_sync_over_gloo(setup):
    client, hf_dir, _ = setup
    state = random_like_state(load_hf_model(hf_dir), seed=7)
    model = _model_with(hf_dir, state)
    metrics, metrics2 = run_single(_distributed_sync_rank, client.urls[0], state, _probe(model), free_port(), timeout=120)
    assert metrics["sync/buckets"] >= 3 and metrics["sync/probe_max_abs_diff"] <= TOL
    assert metrics2["sync/bytes"] == metrics["sync/bytes"]
    _assert_engine_matches(client, model, "7")


def test_malformed_streamed_bucket_is_rejected_and_the_model_kept(setup):
    client, hf_dir, _ = setup
    url = client.urls[0]
    before = client.prompt_logprobs(url, PROBE)
    version = client.run(client.aclient.model_info(url))["weight_version"]
    norm = torch.ones(load_hf_model(hf_dir).config.hidden_size)
    stream = SafetensorsStream([("model.norm.weight", norm * 3.0)])
    header = stream.header.replace(b'"F32"', b'"F33"')  # same length: only the dtype is wrong
    pieces = [header] + list(stream.pieces())[1:]
    body = StreamedBody(stream.nbytes, lambda: iter(pieces))
    with pytest.raises(RequestRejectedError, match=r"unknown dtype 'F33'"):
        client.post_all("/update_weights_from_tensor?weight_version=bad", body)
    assert client.prompt_logprobs(url, PROBE) == before
    assert client.run(client.aclient.model_info(url))["weight_version"] == version


def test_body_cut_short_fails_and_keeps_the_version(setup):
    client, hf_dir, _ = setup
    url = client.urls[0]
    version = client.run(client.aclient.model_info(url))["weight_version"]
    stream = SafetensorsStream([("model.norm.weight", torch.ones(load_hf_model(hf_dir).config.hidden_size))])
    blob = b"".join(stream.pieces())
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /update_weights_from_tensor?weight_version=cut HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/octet-stream\r\n"
                     + f"Content-Length: {len(blob)}\r\nConnection: close\r\n\r\n".encode() + blob[:-10])
        sock.shutdown(socket.SHUT_WR)  # the body stops 10 bytes short
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    # aiohttp treats the half-closed connection as gone (no answer) or answers with the error.
    assert answer == b"" or b"broken off after" in answer or b"body ended after" in answer, answer[:300]
    assert client.run(client.aclient.model_info(url))["weight_version"] == version
    state = random_like_state(load_hf_model(hf_dir), seed=8)  # the worker is free again: a full sync works
    metrics = TensorPushSync(client, bucket_bytes=50_000).sync(iter(state.items()), version=8,
                                                                probe=_probe(_model_with(hf_dir, state)))
    assert metrics["sync/probe_max_abs_diff"] <= TOL
