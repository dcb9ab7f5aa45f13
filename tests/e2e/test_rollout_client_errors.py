"""Clear errors from the client against a real misbehaving HTTP server on loopback (no mocks)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.config import SamplingConfig
from megatron_sdpg.rollout.protocol import (
    EngineTimeoutError,
    EngineUnavailableError,
    MalformedResponseError,
    RequestRejectedError,
)
from megatron_sdpg.testing.distributed import free_port

SAMPLING = SamplingConfig(max_new_tokens=2)


def _item(rid, ids=(5, 6), logprob_ids=None):
    lp_ids = list(ids if logprob_ids is None else logprob_ids)
    return {"text": None, "output_ids": list(ids), "meta_info": {
        "id": rid, "finish_reason": {"type": "length", "length": 2},
        "output_token_logprobs": [[-1.0, t, None] for t in lp_ids]}}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        srv = self.server
        srv.hits += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rids = body.get("rid", [])
        mode = srv.mode
        if mode == "slow":
            time.sleep(2.0)
        if mode == "drop":  # close the connection without any answer
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        status, payload = 200, None
        if mode in ("slow", "ok"):
            payload = [_item(r) for r in rids]
        elif mode == "not_json":
            payload = b"<html>oops</html>"
        elif mode == "short_list":
            payload = [_item(rids[0])]
        elif mode == "wrong_rid":
            payload = [_item("someone-else") for _ in rids]
        elif mode == "wrong_logprob_tokens":
            payload = [_item(r, logprob_ids=(5, 7)) for r in rids]
        elif mode == "missing_meta":
            payload = [{"output_ids": [1]} for _ in rids]
        elif mode == "http500":
            status, payload = 500, b"Internal Server Error"
        elif mode == "http400":
            status, payload = 400, {"error": {"message": "sampling_params.top_p: bad"}}
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the client hung up on "slow": expected
        pass


@pytest.fixture(scope="module")
def bad_server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.mode, srv.hits = "ok", 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _client(srv, **kw):
    kw.setdefault("max_retries", 1)
    return RolloutClient([f"http://127.0.0.1:{srv.server_address[1]}"], backoff_s=0.0, **kw)


@pytest.mark.parametrize("mode, error, message", [
    ("not_json", MalformedResponseError, r"answer is not JSON: '<html>oops</html>'"),
    ("short_list", MalformedResponseError, r"expected a list of 2 items, got 1 items"),
    ("wrong_rid", MalformedResponseError, r"for rid e1-g0-s0: meta_info\.id is 'someone-else'"),
    ("wrong_logprob_tokens", MalformedResponseError, r"output_token_logprobs\[1\] is for token 7, expected 6"),
    ("missing_meta", MalformedResponseError, r"output_ids missing|meta_info missing"),
    ("http500", EngineUnavailableError, r"HTTP 500: Internal Server Error"),
    ("drop", EngineUnavailableError, r"connection failed \((ServerDisconnectedError|ClientOSError)"),
])
def test_retryable_failures_name_the_problem_and_are_retried(bad_server, mode, error, message):
    bad_server.mode, bad_server.hits = mode, 0
    with _client(bad_server) as client:
        with pytest.raises(error, match=message) as info:
            client.generate([[2, 3]], n=2, sampling=SAMPLING, batch_id="e1")
    assert "failed after 2 attempts" in str(info.value)
    assert bad_server.hits == 2


def test_rejection_is_not_retried(bad_server):
    bad_server.mode, bad_server.hits = "http400", 0
    with _client(bad_server, max_retries=3) as client:
        with pytest.raises(RequestRejectedError, match=r"HTTP 400: .*sampling_params\.top_p: bad"):
            client.generate([[2, 3]], n=1, sampling=SAMPLING)
    assert bad_server.hits == 1


def test_timeout(bad_server):
    bad_server.mode = "slow"
    with _client(bad_server, max_retries=0, request_timeout_s=0.3) as client:
        with pytest.raises(EngineTimeoutError, match=r"POST http://127\.0\.0\.1:\d+/generate: no answer within 0\.3s"):
            client.generate([[2, 3]], n=1, sampling=SAMPLING)


def test_connection_refused():
    port = free_port()  # nothing listens there
    with RolloutClient([f"http://127.0.0.1:{port}"], max_retries=1, backoff_s=0.0) as client:
        with pytest.raises(EngineUnavailableError, match=rf"127\.0\.0\.1:{port}/generate: cannot connect"):
            client.generate([[2, 3]], n=1, sampling=SAMPLING)
        assert not client.run(client.aclient.healthy(client.urls[0]))


def test_well_formed_answer_parses(bad_server):
    bad_server.mode = "ok"
    with _client(bad_server) as client:
        groups, metrics = client.generate([[2, 3], [4]], n=2, sampling=SAMPLING, batch_id="ok")
    assert [[s.rid for s in g] for g in groups] == [["ok-g0-s0", "ok-g0-s1"], ["ok-g1-s0", "ok-g1-s1"]]
    assert groups[1][0].logprobs == [-1.0, -1.0] and metrics["rollout/retries"] == 0
