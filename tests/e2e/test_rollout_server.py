"""The CPU rollout server end to end through the client, on 127.0.0.1 (real processes).

Log-probs are compared with a float64 dense forward of the same tokens (tolerance 1e-4:
the server decodes in fp32 with a KV cache and left padding).
"""

from __future__ import annotations

import pytest

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.config import SamplingConfig
from megatron_sdpg.rollout.protocol import RequestRejectedError
from megatron_sdpg.testing.rollout import reference_logprobs, start_cpu_server
from megatron_sdpg.testing.tiny_hf import EOS_ID, build_tiny_llama, load_hf_model

TOL = 1e-4
PROMPTS = [[2, 5, 6, 7], [2, 9], [2, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_server")
    hf_dir = build_tiny_llama(str(root / "tiny"))
    engine = start_cpu_server(hf_dir, str(root / "logs"))
    client = RolloutClient([engine.url], max_retries=0, request_timeout_s=60.0)
    try:
        yield client, load_hf_model(hf_dir)
    finally:
        client.close()
        engine.stop()


def _check_logprobs(model, sample, temperature):
    _, ref = reference_logprobs(model, sample.prompt_ids, sample.output_ids, temperature)
    assert len(sample.logprobs) == len(ref) == len(sample.output_ids)
    assert max(abs(a - b) for a, b in zip(sample.logprobs, ref)) <= TOL


def test_groups_of_n_with_logprobs_matching_a_dense_forward(setup):
    client, model = setup
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=12, seed=123, ignore_eos=True)
    groups, metrics = client.generate(PROMPTS, n=4, sampling=sampling, batch_id="b0")
    assert [len(g) for g in groups] == [4, 4, 4]
    rids = [s.rid for g in groups for s in g]
    assert rids == [f"b0-g{g}-s{k}" for g in range(3) for k in range(4)]
    for g, grp in enumerate(groups):
        for k, s in enumerate(grp):
            assert (s.group, s.index, s.prompt_ids) == (g, k, PROMPTS[g])
            assert len(s.output_ids) == 12 and s.finish_reason == "length"
            assert s.weight_version == "default"
            _check_logprobs(model, s, 0.8)
    assert len({tuple(s.output_ids) for s in groups[0]}) > 1, "distinct seeds gave identical samples"
    assert metrics["rollout/samples"] == 12 and metrics["rollout/completion_tokens"] == 144
    assert metrics["rollout/tokens_per_s"] > 0


def test_same_seed_same_samples_and_top_k_top_p(setup):
    client, model = setup
    sampling = SamplingConfig(temperature=1.3, top_p=0.9, top_k=20, max_new_tokens=8, seed=7, ignore_eos=True)
    a, _ = client.generate(PROMPTS[:2], n=2, sampling=sampling)
    b, _ = client.generate(PROMPTS[:2], n=2, sampling=sampling)
    assert [s.output_ids for g in a for s in g] == [s.output_ids for g in b for s in g]
    c, _ = client.generate(PROMPTS[:2], n=2, sampling=sampling, seed=8)
    assert [s.output_ids for g in a for s in g] != [s.output_ids for g in c for s in g]
    for s in (s for g in a for s in g):
        _check_logprobs(model, s, 1.3)  # log-probs are before top-k/top-p filtering, as in SGLang


def test_stop_token_and_max_length(setup):
    client, model = setup
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    [[free]], _ = client.generate([PROMPTS[2]], n=1, sampling=greedy)
    assert free.finish_reason == "length" and len(free.output_ids) == 10
    _check_logprobs(model, free, 1.0)  # greedy: SGLang reports temperature-1 log-probs
    # Stop at the greedy path's third token: it is kept, nothing after it.
    stop_tok = free.output_ids[2]
    first = free.output_ids.index(stop_tok)
    stopped = SamplingConfig(temperature=0.0, max_new_tokens=10, stop_token_ids=[stop_tok], ignore_eos=True)
    [[s]], _ = client.generate([PROMPTS[2]], n=1, sampling=stopped)
    assert s.finish_reason == "stop" and s.matched == stop_tok
    assert s.output_ids == free.output_ids[: first + 1]
    short = SamplingConfig(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    [[s3]], _ = client.generate([PROMPTS[2]], n=1, sampling=short)
    assert s3.output_ids == free.output_ids[:3] and s3.finish_reason == "length"


def test_eos_stops_unless_ignored(setup):
    client, _ = setup
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=1)
    groups, _ = client.generate(PROMPTS, n=8, sampling=sampling)
    for s in (s for g in groups for s in g):
        if s.finish_reason == "stop":
            assert s.output_ids[-1] == EOS_ID and s.matched == EOS_ID and EOS_ID not in s.output_ids[:-1]
        else:
            assert len(s.output_ids) == 40 and EOS_ID not in s.output_ids


def test_prompt_logprobs_are_raw_log_softmax(setup):
    client, model = setup
    probe = [2, 17, 33, 4, 99, 5, 63]
    got = client.prompt_logprobs(client.urls[0], probe)
    ref, _ = reference_logprobs(model, probe, [])
    assert len(got) == len(probe) - 1
    assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL


def test_unsupported_request_is_rejected_naming_the_field(setup):
    client, _ = setup
    bad = {"input_ids": [2, 5], "sampling_params": {"max_new_tokens": 2, "frequency_penalty": 0.5}}
    with pytest.raises(RequestRejectedError, match=r"sampling_params\[0\]\.frequency_penalty"):
        client.run(client.aclient.call(client.urls[0], "POST", "/generate", bad))
    with pytest.raises(RequestRejectedError, match=r"input_ids\[0\]: token id 999"):
        client.run(client.aclient.call(client.urls[0], "POST", "/generate", {"input_ids": [999]}))


def test_passive_omp_waits_on_two_threads_serve_the_same_numbers(tmp_path):
    """``--omp-wait passive`` (what the launcher passes under ``rollout.off_policy_steps: 1``) with a
    2-thread decode: the server starts and its log-probs match the float64 dense forward."""
    hf_dir = build_tiny_llama(str(tmp_path / "tiny"))
    engine = start_cpu_server(hf_dir, str(tmp_path / "logs"), threads=2, omp_wait="passive")
    client = RolloutClient([engine.url], max_retries=0, request_timeout_s=60.0)
    try:
        sampling = SamplingConfig(temperature=0.8, max_new_tokens=12, seed=123, ignore_eos=True)
        groups, _ = client.generate(PROMPTS, n=2, sampling=sampling)
        model = load_hf_model(hf_dir)
        for s in (s for g in groups for s in g):
            assert len(s.output_ids) == 12
            _check_logprobs(model, s, 0.8)
    finally:
        client.close()
        engine.stop()
