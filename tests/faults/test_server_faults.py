"""The CPU rollout server under hostile requests (issue 17, items 7, 8 and 9), on one real server.

* 7: a ``/health_generate`` that times out while a long batch runs cancels its
  probe; the worker must survive it (``/generate`` and control jobs still answer).
* 8: a bad request gets 400 naming its field, and the good requests sent with it
  (merged into the same batch) succeed.
* 9: ``n``, ``max_new_tokens`` and the queued tokens are bounded (400 naming the
  server flag); joining a weight-update group at a dead address does not hold up
  generation and fails within the server's bound.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.testing.rollout import start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama
from tests.faults.httpcall import call

LIMITS = {"max_n": 8, "max_new_tokens": 4096, "max_queued_tokens": 40000}
GOOD = {"input_ids": [2, 5, 6], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_faults")
    engine = start_cpu_server(build_tiny_llama(str(root / "tiny")), str(root / "logs"), health_timeout_s=0.5,
                              weight_group_timeout_s=3, **LIMITS)
    try:
        yield engine.url
    finally:
        engine.stop(grace_s=2.0)


def _generate_ok(url: str, timeout: float = 60.0) -> list[int]:
    status, out = call(url, "/generate", GOOD, timeout=timeout)
    assert status == 200, out
    assert len(out["output_ids"]) == 4
    return out["output_ids"]


def test_cancelled_health_probe_leaves_worker_alive(url):
    expected = _generate_ok(url)
    long_body = {"input_ids": [[2, 7 + i] for i in range(8)], "rid": "long",
                 "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long_req = pool.submit(call, url, "/generate", long_body, None, 120.0)
        # Either times out behind the long batch (503) or is merged into it; the probe's future is cancelled
        # when its 0.5 s are up while the batch still runs.
        status, _ = call(url, "/health_generate", timeout=60.0)
        assert status in (200, 503)
        assert call(url, "/abort_request", {"abort_all": True}, timeout=30.0)[0] == 200
        long_status, _ = long_req.result(timeout=120)
    assert long_status == 200
    # The worker still runs generate jobs and control jobs.
    assert _generate_ok(url, timeout=60.0) == expected
    status, out = call(url, "/destroy_weights_update_group", {"group_name": "none"}, timeout=60.0)
    assert status == 400 and "does not exist" in out["message"]
    assert call(url, "/health", timeout=10.0)[0] == 200
    assert call(url, "/health_generate", timeout=60.0)[0] == 200


BAD = [  # (raw body, field the answer must name)
    (b'{"input_ids": [2, 3], "sampling_params": {"sampling_seed": 100000000000000000000000}}', "sampling_seed"),
    (b'{"input_ids": [2, 3], "sampling_params": {"temperature": NaN}}', "temperature"),
    (b'{"input_ids": [2, 3], "sampling_params": {"max_new_tokens": NaN}}', "max_new_tokens"),
    (b'{"input_ids": [2, 3], "sampling_params": {"max_new_tokens": Infinity}}', "max_new_tokens"),
    (b'{"input_ids": [2, 3], "return_logprob": true, "logprob_start_len": "abc"}', "logprob_start_len"),
    (b'{"text": [1, 2]}', "text"),
    (b'{"input_ids": [2, 3], "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", "body"),
]


def test_bad_requests_get_400_and_spare_their_neighbours(url):
    long_body = {"input_ids": [2, 7], "rid": "hold", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        hold = pool.submit(call, url, "/generate", long_body, None, 120.0)  # keeps the worker busy ...
        time.sleep(0.5)  # (ordering only)
        good = [pool.submit(call, url, "/generate", GOOD, None, 120.0) for _ in range(8)]
        bad = [pool.submit(call, url, "/generate", None, raw, 120.0) for raw, _ in BAD]
        time.sleep(1.0)  # (ordering only) ... so that every request waits in the queue, merged into one batch
        assert call(url, "/abort_request", {"rid": "hold"}, timeout=30.0)[0] == 200
        good_out = [f.result(timeout=180) for f in good]
        bad_out = [f.result(timeout=180) for f in bad]
        assert hold.result(timeout=180)[0] == 200
    for status, out in good_out:
        assert status == 200 and len(out["output_ids"]) == 4, (status, out)
    assert len({tuple(out["output_ids"]) for _, out in good_out}) == 1  # greedy: all the same
    for (raw, field), (status, out) in zip(BAD, bad_out):
        assert status == 400, (raw[:80], status, out)
        assert field in out["error"]["message"], (field, out)


@pytest.mark.parametrize("params,flag", [
    ({"n": 9}, "--max-n 8"),
    ({"max_new_tokens": 10**9, "ignore_eos": True}, "--max-new-tokens 4096"),
    ({"max_new_tokens": 4096, "ignore_eos": True, "n": 8}, "--max-queued-tokens 40000"),  # 2 x 8 x 4098 tokens
])
def test_limits_give_400_naming_the_flag(url, params, flag):
    body = {"input_ids": [[2, 3], [4, 5]], "sampling_params": params}
    status, out = call(url, "/generate", body, timeout=60.0)
    assert status == 400 and flag in out["error"]["message"], out
    _generate_ok(url)


def test_weight_group_at_dead_address_does_not_block_generation(url):
    body = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
            "group_name": "dead", "backend": "gloo"}
    result: dict = {}
    joiner = threading.Thread(target=lambda: result.update(out=call(url, "/init_weights_update_group", body,
                                                                     timeout=120.0)), daemon=True)
    joiner.start()
    time.sleep(1.0)  # (ordering only) let the join reach the server first
    try:
        _generate_ok(url, timeout=30.0)  # answered while the join still waits for the dead trainer
    finally:
        joiner.join(timeout=120)
    assert not joiner.is_alive(), "init_weights_update_group did not answer within 120 s"
    status, out = result["out"]
    assert status == 400 and out["success"] is False, out


def test_full_queue_gives_503_naming_the_limit(url):
    hold = {"input_ids": [2, 7], "rid": "hold", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True, "n": 8}}
    more = {"input_ids": [2, 3], "sampling_params": {"max_new_tokens": 3995, "n": 2}}  # 7994 tokens: fits alone
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(call, url, "/generate", hold, None, 120.0)  # 8 x 4002 = 32016 of the 40000 tokens
        time.sleep(0.5)  # (ordering only)
        try:
            status, out = call(url, "/generate", more, timeout=60.0)
        finally:
            call(url, "/abort_request", {"abort_all": True}, timeout=30.0)
        assert held.result(timeout=120)[0] == 200
    assert status == 503 and "--max-queued-tokens 40000" in out["error"]["message"], (status, out)
    _generate_ok(url)  # the queue drained
