"""The post-sync probe against a real CPU rollout server: NaN/inf fail it and are reported as such.

``nan > threshold`` is False, so a check written as a comparison passed NaN weights and
reported a worst difference of 0.0. The trainer's side (the Megatron forward of the
probe) is checked end to end by ``test_trainer_checkpoints`` (``sync/probe_max_abs_diff``
logged every step, below 1e-4 against the engine's fp32 HF forward).
"""

import math

import pytest

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.testing.rollout import reference_logprobs, start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model
from megatron_sdpg.train.probe import probe_token_ids
from megatron_sdpg.rollout.sync import ProbeCheck, TensorPushSync, WeightSyncMismatchError


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    hf_dir = build_tiny_llama(str(root / "tiny"), vocab_size=64, hidden=32)
    server = start_cpu_server(hf_dir, str(root / "logs"))
    client = RolloutClient([server.url], max_retries=0, request_timeout_s=60.0)
    try:
        ids = probe_token_ids(64)
        ref, _ = reference_logprobs(load_hf_model(hf_dir), ids, [])
        yield client, ids, ref
    finally:
        client.close()
        server.stop()


def test_matching_weights_pass_and_report_the_difference(engine):
    client, ids, ref = engine
    worst = TensorPushSync(client).check_probe(ProbeCheck(ids, ref, 1e-4))
    assert 0 <= worst <= 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_log_probs_fail_the_probe(engine, bad):
    client, ids, ref = engine
    trainer = list(ref)
    trainer[3] = bad  # what NaN/inf trainer weights give
    with pytest.raises(WeightSyncMismatchError) as err:
        TensorPushSync(client).check_probe(ProbeCheck(ids, trainer, 1e-3))
    message = str(err.value)
    assert "log-prob = nan" in message or "log-prob = inf" in message, message
    assert "at probe position 4" in message and "non-finite" in message, message


def test_all_nan_on_both_sides_fails(engine):
    client, ids, _ = engine
    with pytest.raises(WeightSyncMismatchError, match="log-prob = nan"):
        TensorPushSync(client).check_probe(ProbeCheck(ids, [math.nan] * (len(ids) - 1), 1e-3))
