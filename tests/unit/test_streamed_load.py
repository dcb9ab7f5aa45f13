"""``StreamedLoad``: a safetensors body fed in arbitrary chunks lands bit-identically in the
parameters (cast where dtypes differ); cut-off, overlong, overlapping and non-finite bodies are
refused, the parameters they touched left marked dirty."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_sdpg.rollout.server.weights import StreamedLoad
from megatron_sdpg.formats.safetensors_stream import SafetensorsStream
from megatron_sdpg.formats.safetensors_format import parse_safetensors_header


def _params() -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(5, 7), "b": torch.zeros(11, dtype=torch.bfloat16), "c": torch.zeros(3),
            "d": torch.zeros(0, 2), "untouched": torch.full((4,), 9.0)}


def _body(named) -> tuple[bytes, list, int]:
    blob = b"".join(SafetensorsStream(named).pieces())
    entries, data_start = parse_safetensors_header(blob[:8], lambda n: blob[8 : 8 + n], len(blob), "body")
    return blob, entries, data_start


def _sent() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [("a", torch.randn(5, 7, generator=gen)), ("b", torch.randn(11, generator=gen).bfloat16()),
            ("c", torch.tensor([1.5, -0.0, 3.0e38], dtype=torch.bfloat16)),  # cast into fp32
            ("d", torch.zeros(0, 2))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunks_of_any_size_load_bit_identically(seed):
    params = _params()
    sent = _sent()
    blob, entries, data_start = _body(sent)
    load = StreamedLoad(params, entries, data_start, len(blob))
    rng = random.Random(seed)
    pos = data_start
    while pos < len(blob):  # 1-byte to 64-byte chunks: tensors split anywhere
        step = rng.randint(1, 64)
        load.feed(blob[pos : pos + step])
        pos += step
    assert load.finish() == sum(t.numel() * t.element_size() for _, t in sent)
    for name, t in sent:
        want = t.to(params[name].dtype)
        ints = {2: torch.int16, 4: torch.int32}[want.element_size()]
        assert torch.equal(params[name].view(ints), want.view(ints)), name
    assert torch.equal(params["untouched"], torch.full((4,), 9.0))


def test_cut_off_and_overlong_bodies_are_refused():
    params = _params()
    blob, entries, data_start = _body(_sent())
    load = StreamedLoad(params, entries, data_start, len(blob))
    load.feed(blob[data_start:-3])
    with pytest.raises(ValueError, match=rf"body: ended after {len(blob) - 3} of {len(blob)} bytes"):
        load.finish()
    load = StreamedLoad(_params(), entries, data_start, len(blob))
    with pytest.raises(ValueError, match=rf"body: more than the {len(blob)} bytes announced"):
        load.feed(blob[data_start:] + b"xx")


def test_overlapping_tensors_are_refused():
    _, entries, data_start = _body(_sent())
    a = next(e for e in entries if e[0] == "a")
    c = next(e for e in entries if e[0] == "c")
    overlapping = [a, ("c", c[1], c[2], a[3], a[3] + (c[4] - c[3]))]
    with pytest.raises(ValueError, match="tensors 'a' and 'c' overlap in the data section"):
        StreamedLoad(_params(), overlapping, data_start, data_start + a[4])


def test_non_finite_or_cut_off_body_leaves_its_tensors_dirty():
    sent = _sent()
    sent[0] = ("a", torch.full((5, 7), float("nan")))
    blob, entries, data_start = _body(sent)
    dirty: set[str] = set()
    load = StreamedLoad(_params(), entries, data_start, len(blob), dirty)
    load.feed(blob[data_start:])
    with pytest.raises(ValueError, match="weight 'a' holds NaN or inf values"):
        load.finish()
    assert dirty == {"a", "b", "c", "d"}

    blob, entries, data_start = _body(_sent())
    load = StreamedLoad(_params(), entries, data_start, len(blob), dirty)
    load.feed(blob[data_start:-3])
    with pytest.raises(ValueError, match="ended after"):
        load.finish()
    assert dirty == {"a", "b", "c", "d"}
    load = StreamedLoad(_params(), entries, data_start, len(blob), dirty)
    load.feed(blob[data_start:])
    load.finish()  # a complete body of the same tensors heals them
    assert dirty == set()


def test_streamed_update_finishes_on_the_model_worker_thread(tmp_path, monkeypatch):
    """The finite checks and casts (torch ops) of a streamed ``/update_weights_from_tensor`` run on the model
    worker, never on the event loop's thread: torch ops there gave that thread an OpenMP team of its own, and
    the worker's decode steps then ran ~30% slower. Real app, real HTTP on loopback, one real update."""
    import asyncio
    import threading
    import urllib.request

    from aiohttp import web

    from megatron_sdpg.formats.tensor_codec import safetensors_blob
    from megatron_sdpg.rollout.server.app import ServerState, build_app
    from megatron_sdpg.testing.distributed import free_port
    from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model

    hf_dir = build_tiny_llama(str(tmp_path / "tiny"))
    model = load_hf_model(hf_dir)
    threads: list[str] = []
    finish = StreamedLoad.finish

    def recording_finish(self):
        threads.append(threading.current_thread().name)
        return finish(self)

    monkeypatch.setattr(StreamedLoad, "finish", recording_finish)
    state = ServerState(model, None, hf_dir, seed=0, max_batch=8)
    port, loop, ready = free_port(), asyncio.new_event_loop(), threading.Event()
    runner = web.AppRunner(build_app(state, max_body_bytes=1 << 30))

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    assert ready.wait(30)
    try:
        new = {k: v.detach().clone() + 0.01 for k, v in model.state_dict().items() if k != "lm_head.weight"}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/update_weights_from_tensor?weight_version=v1",
                                     data=safetensors_blob(sorted(new.items())),
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert b'"success": true' in resp.read()
        assert threads == ["model-worker"]
        assert state.weight_version == "v1" and state.weights.not_ready() is None
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(dict(model.named_parameters())[name].detach(), new[name])
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        server.join(30)
