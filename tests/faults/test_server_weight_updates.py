"""Weight updates that must not leave a server serving wrong weights (issue 17, item 10).

* A streamed ``/update_weights_from_tensor`` body cut off mid-data: the server
  must not serve the half-written weights (it answers 503 on ``/generate`` and
  ``/health``, weight version unchanged) until a complete update arrives; then it
  serves exactly the new complete weights.
* ``/update_weights_from_disk`` with int64 tensors (would truncate every float
  weight) or NaN values: 400, version unchanged, outputs unchanged.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from megatron_sdpg.testing.rollout import random_like_state, start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model
from megatron_sdpg.formats.tensor_codec import safetensors_blob
from tests.faults.httpcall import call

PROBE = {"input_ids": [[2, 5, 6], [2, 9]], "return_logprob": True,
         "sampling_params": {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_updates")
    hf_dir = build_tiny_llama(str(root / "tiny"))
    engine = start_cpu_server(hf_dir, str(root / "logs"))
    try:
        yield engine.url, hf_dir, root
    finally:
        engine.stop(grace_s=2.0)


def _probe(url):
    status, out = call(url, "/generate", PROBE, timeout=60.0)
    assert status == 200, out
    return [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in out]


def _version(url):
    return call(url, "/model_info", timeout=30.0)[1]["weight_version"]


def _checkpoint_like(hf_dir, out_dir, tensors):
    os.makedirs(out_dir)
    shutil.copy(os.path.join(hf_dir, "config.json"), out_dir)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def test_streamed_update_cut_off_is_never_served(setup):
    url, hf_dir, root = setup
    before, version = _probe(url), _version(url)
    new_state = random_like_state(load_hf_model(hf_dir), seed=5)
    body = safetensors_blob(sorted(new_state.items()))
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall((f"POST /update_weights_from_tensor?weight_version=cut HTTP/1.1\r\nHost: x\r\n"
                   f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode())
        s.sendall(body[: len(body) * 2 // 3])  # header and part of the data, then the connection drops
    # The server handles the lost connection on its event loop, in order with later requests: either it
    # had written part of the data (503 from then on) or it dropped the update before writing (200, old
    # weights). A few seconds' grace covers a loaded machine (it took milliseconds here; the test waited
    # 60 s in the 200 case before).
    deadline = time.monotonic() + 5
    while call(url, "/health", timeout=10.0)[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    status, out = call(url, "/generate", PROBE, timeout=60.0)
    if status == 200:  # an engine may keep serving, but only the previous weights
        got = [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in out]
        assert got == before, "half-written weights served under the old weight version"
        time.sleep(0.5)
        assert _probe(url) == before, "the cut update was written after all"
    else:  # or it is unhealthy until a complete update arrives (this server)
        assert status == 503 and "partly written" in out["error"]["message"], (status, out)
        status, out = call(url, "/health", timeout=10.0)
        assert status == 503 and "partly written" in out, (status, out)
    assert _version(url) == version

    # A complete update heals the engine: it then serves exactly the new weights.
    full = _checkpoint_like(hf_dir, str(root / "new_full"), new_state)
    status, out = call(url, "/update_weights_from_disk", {"model_path": full, "weight_version": "v2"}, timeout=60.0)
    assert status == 200, out
    assert call(url, "/health", timeout=10.0)[0] == 200 and _version(url) == "v2"
    after = _probe(url)
    assert after != before
    # Back to the starting checkpoint: the first outputs again, bit for bit.
    assert call(url, "/update_weights_from_disk", {"model_path": hf_dir, "weight_version": "v3"}, timeout=60.0)[0] == 200
    assert _probe(url) == before


@pytest.mark.parametrize("kind", ["int64", "nan"])
def test_disk_update_with_int64_or_nan_is_refused(setup, kind):
    url, hf_dir, root = setup
    before, version = _probe(url), _version(url)
    state = random_like_state(load_hf_model(hf_dir), seed=7)
    if kind == "int64":
        state = {k: (v * 10).to(torch.int64) for k, v in state.items()}
        field = "dtype torch.int64"
    else:
        name = sorted(state)[3]
        state[name] = torch.full_like(state[name], float("nan"))
        field = "NaN"
    bad = _checkpoint_like(hf_dir, str(root / f"bad_{kind}"), state)
    status, out = call(url, "/update_weights_from_disk", {"model_path": bad, "weight_version": "bad"}, timeout=60.0)
    assert status == 400 and out["success"] is False and field in out["message"], out
    assert _version(url) == version
    assert call(url, "/health", timeout=10.0)[0] == 200
    assert _probe(url) == before
