"""Weight sync to the CPU rollout server, by disk and by tensor push, against raw transport speeds.

Usage::

    python benchmarks/bench_weight_sync.py              # ~0.47B-parameter bf16 Llama (~0.95 GB)
    python benchmarks/bench_weight_sync.py --quick      # ~20M parameters, a few seconds
    python benchmarks/bench_weight_sync.py --params 2e8 --bucket-mb 128

Prints JSON lines: the raw speeds of the same bytes (memcpy; disk write + fsync +
reading them back, since the engine must load what was written; loopback HTTP POST
of raw bytes with aiohttp), then each strategy's seconds and
GB/s with its ratio to the raw speed of the transport it uses (target >= 0.5).
Baselines and strategies are measured in turn within each repeat (the machine
may be shared), in alternating order, and the best of ``--repeats`` is reported
for each.
The server holds its own copy of the model, so memory is about 3x the model size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdpg.testing.distributed import free_port  # noqa: E402


def synthetic_config(params: float):
    """A Llama config near ``params`` parameters (hidden 1024, vocab 32000, untied embeddings;
    hidden 512, vocab 8000 below 1e8 parameters)."""
    from transformers import LlamaConfig

    hidden, inter, vocab, heads, kv = (1024, 4096, 32000, 16, 8) if params >= 1e8 else (512, 2048, 8000, 8, 4)
    head = hidden // heads
    per_layer = hidden * (hidden + 2 * kv * head) + hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                       max_position_embeddings=4096)


def synthetic_state(config, seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 tensors with the model's HF names and shapes (built without the model)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16) for n, p in meta.state_dict().items()}


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def raw_memcpy(state: dict[str, torch.Tensor], dst: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for d, t in zip(dst, state.values()):
        d.copy_(t)
    return time.perf_counter() - start


def raw_disk_write_read(state: dict[str, torch.Tensor], dst: list[torch.Tensor], directory: str) -> float:
    """Write + fsync of the bytes, then reading them back into ``dst`` (what a disk sync
    must do at least: the engine reads what the trainer wrote). ``dst`` is allocated and
    touched once, like an engine's parameters: page faults of fresh memory are not part
    of the transport (on this VM they cost more than the read)."""
    path = os.path.join(directory, "raw.bin")
    start = time.perf_counter()
    with open(path, "wb") as f:
        for t in state.values():
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:
        for t in dst:
            f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elapsed = time.perf_counter() - start
    os.remove(path)
    return elapsed


def _sink_server(port: int) -> None:
    from aiohttp import web

    async def sink(request):
        n = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            n += len(chunk)
        return web.json_response({"bytes": n})

    app = web.Application(client_max_size=1 << 34)
    app.router.add_post("/sink", sink)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _pieces_payload(blob: bytes):
    """An aiohttp body that writes ``blob`` in ``PIECE_BYTES`` slices, draining in between.

    Handing aiohttp one large ``bytes`` makes asyncio copy all that the socket does not
    take at once into a fresh transport buffer (~the whole body); writing slices is how
    the transport is best used, and how ``TensorPushSync`` sends (the baseline must not
    be slower than the transport allows)."""
    from aiohttp.payload import Payload

    from megatron_sdpg.formats.safetensors_stream import PIECE_BYTES

    class PiecesPayload(Payload):
        def decode(self, encoding="utf-8", errors="strict"):
            raise TypeError("binary")

        async def write(self, writer):
            await self.write_with_length(writer, None)

        async def write_with_length(self, writer, content_length):
            view = memoryview(self._value)
            for start in range(0, len(view), PIECE_BYTES):
                await writer.write(view[start : start + PIECE_BYTES])

    payload = PiecesPayload(blob, content_type="application/octet-stream")
    payload._size = len(blob)
    return payload


class RawHttp:
    """Loopback POSTs of the raw bytes in bucket-sized bodies (no encoding) to another
    process that counts them; the sink stays up between measurements."""

    def __init__(self, state: dict[str, torch.Tensor], bucket_bytes: int):
        self.port = free_port()
        self.proc = mp.get_context("spawn").Process(target=_sink_server, args=(self.port,), daemon=True)
        self.proc.start()
        self.blobs, cur, size = [], [], 0
        for t in state.values():
            cur.append(t.contiguous().view(torch.uint8).numpy().tobytes())
            size += len(cur[-1])
            if size >= bucket_bytes:
                self.blobs.append(b"".join(cur))
                cur, size = [], 0
        if cur:
            self.blobs.append(b"".join(cur))
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._connect())

    async def _connect(self):
        import aiohttp

        session = aiohttp.ClientSession()
        for _ in range(300):
            try:
                async with session.post(f"http://127.0.0.1:{self.port}/sink", data=b"x"):
                    return session
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.1)
        await session.close()
        raise RuntimeError("the HTTP sink did not start")

    async def _send_all(self) -> float:
        start = time.perf_counter()
        for blob in self.blobs:
            async with self.session.post(f"http://127.0.0.1:{self.port}/sink", data=_pieces_payload(blob)) as r:
                assert (await r.json())["bytes"] == len(blob)
        return time.perf_counter() - start

    def measure(self) -> float:
        return self.loop.run_until_complete(self._send_all())

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()
        self.proc.kill()
        self.proc.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=5e8, help="approximate parameter count")
    ap.add_argument("--bucket-mb", type=float, default=256.0, help="tensor-push bucket size")
    ap.add_argument("--quick", action="store_true", help="~20M parameters")
    ap.add_argument("--repeats", type=int, default=4, help="runs of each measurement; the best is reported")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.params = 2e7

    from megatron_sdpg.rollout.blocking_client import RolloutClient
    from megatron_sdpg.testing.rollout import start_cpu_server
    from megatron_sdpg.rollout.sync import DiskSync, TensorPushSync
    from megatron_sdpg.rollout.sync.disk import write_hf_checkpoint

    config = synthetic_config(args.params)
    bucket = int(args.bucket_mb * 2**20)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        state = synthetic_state(config, seed=0)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        nparams = sum(t.numel() for t in state.values())
        emit(bench="setup", params=nparams, bytes=nbytes, layers=config.num_hidden_layers, dtype="bfloat16")
        base = os.path.join(tmp, "base")
        config.save_pretrained(base)
        write_hf_checkpoint(iter(state.items()), os.path.join(base, "w"), shard_bytes=2**31)
        for f in os.listdir(os.path.join(base, "w")):
            os.rename(os.path.join(base, "w", f), os.path.join(base, f))

        engine = start_cpu_server(base, os.path.join(tmp, "logs"), threads=2, timeout_s=600, dtype="bfloat16")
        client = RolloutClient([engine.url], max_retries=0, request_timeout_s=1800)
        http = RawHttp(state, bucket)
        try:
            new = synthetic_state(config, seed=1)
            strategies = {
                "disk": (DiskSync(client, os.path.join(tmp, "sync"), config_dir=base, keep_last=1), "disk_write_read"),
                "tensor": (TensorPushSync(client, bucket_bytes=bucket, timeout_s=1800), "http_loopback"),
            }
            # Each repeat measures every baseline and strategy in turn, so both see the same machine
            # (it may be shared); the best of --repeats is reported for each. The order within a pair
            # alternates: on this VM, memory freed a moment ago (the previous file's page cache) is
            # much cheaper to fill than memory idle for seconds, and the second of a pair gets it.
            # Warm-up, untimed: the server's first write into its parameters faults their pages in
            # (once per server; the raw baselines' destinations are touched before timing too).
            strategies["tensor"][0].sync(iter(new.items()), version="warmup")
            dst = [torch.zeros_like(t) for t in state.values()]  # the raw baselines' destination, kept
            raw: dict[str, list[float]] = {"memcpy": [], "disk_write_read": [], "http_loopback": []}
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in strategies}
            for i in range(args.repeats):
                raw["memcpy"].append(raw_memcpy(state, dst))
                pairs = [
                    (lambda: raw["disk_write_read"].append(raw_disk_write_read(state, dst, tmp)),
                     lambda: runs["disk"].append(strategies["disk"][0].sync(iter(new.items()), version=f"disk{i}"))),
                    (lambda: raw["http_loopback"].append(http.measure()),
                     lambda: runs["tensor"].append(strategies["tensor"][0].sync(iter(new.items()), version=f"tensor{i}"))),
                ]
                for baseline, strategy in pairs:
                    for measure in (baseline, strategy) if i % 2 == 0 else (strategy, baseline):
                        measure()
            best = {name: min(secs) for name, secs in raw.items()}
            for name, sec in best.items():
                emit(bench=f"raw_{name}", seconds=round(sec, 4), gb_per_s=round(nbytes / sec / 1e9, 3),
                     all_seconds=[round(x, 3) for x in raw[name]])
            for name, (_, transport) in strategies.items():
                m = min(runs[name], key=lambda r: r["sync/time_s"])
                gbps = nbytes / m["sync/time_s"] / 1e9
                raw_gbps = nbytes / best[transport] / 1e9
                emit(bench=f"sync_{name}", seconds=round(m["sync/time_s"], 4), gb_per_s=round(gbps, 3),
                     transport=transport, ratio_vs_raw_transport=round(gbps / raw_gbps, 3),
                     ratio_vs_memcpy=round(gbps / (nbytes / best["memcpy"] / 1e9), 4),
                     all_seconds=[round(r["sync/time_s"], 3) for r in runs[name]],
                     details={k: round(v, 4) for k, v in m.items() if k not in ("sync/time_s", "sync/gb_per_s")})
        finally:
            http.close()
            client.close()
            engine.stop()


if __name__ == "__main__":
    main()
