"""``/update_weights_from_tensor`` with a raw safetensors body, loaded while it arrives.

The event loop reads the body: first the header, which is checked against the
model (names, shapes, offsets) before any data is read; then the data chunks,
which it hands to the model worker, which copies them into the parameters
(``StreamedLoad``). Receiving and copying thus overlap on two threads, no buffer
of the whole bucket is allocated, and each byte is copied once after the socket.
At most ``CHUNKS_IN_FLIGHT`` chunks wait for the worker (TCP backpressure beyond).
"""

from __future__ import annotations

import asyncio
import queue
import struct
from typing import Any, Callable

from aiohttp import web

from megatron_sdpg.rollout.server.requests import BadRequest
from megatron_sdpg.rollout.server.weights import ModelWeights
from megatron_sdpg.weights.tensor_codec import parse_safetensors_header

CHUNKS_IN_FLIGHT = 64  # aiohttp hands over the socket's reads (<= 256 KiB each)


def query_options(request: web.Request) -> dict[str, Any]:
    """Options given in the query string; ``true``/``false`` become booleans."""
    return {k: {"true": True, "false": False}.get(v, v) for k, v in request.query.items()}


async def drain(content) -> None:
    """Reads and drops the rest of a body (a client still sending would not see the answer)."""
    while await content.readany():
        pass


async def receive_streamed_update(request: web.Request, weights: ModelWeights,
                                  run_on_worker: Callable[[Callable[[], int]], "asyncio.Future[int]"],
                                  max_bytes: int) -> int:
    """Loads an ``application/octet-stream`` safetensors body into the model.

    Args:
        request: The request; its body is the safetensors serialisation.
        weights: The served model's parameters.
        run_on_worker: Runs a function on the model worker and returns an awaitable of its result.
        max_bytes: Largest accepted body.

    Returns:
        Bytes loaded.

    Raises:
        BadRequest: No Content-Length, too large, or cut short.
        ValueError: A bad header or one that does not fit the model (nothing is written then).
    """
    n = request.content_length
    if n is None:
        raise BadRequest("body: an application/octet-stream body needs a Content-Length")
    if n > max_bytes:
        raise BadRequest(f"body: {n} bytes, more than the server's limit of {max_bytes}")
    content = request.content
    try:
        try:
            first8 = await content.readexactly(min(8, n))
            (header_len,) = struct.unpack("<Q", first8) if len(first8) == 8 else (0,)
            raw = await content.readexactly(header_len) if 2 <= header_len <= n - 8 else b""
        except asyncio.IncompleteReadError:
            raise BadRequest(f"body: Content-Length is {n} but the body ended inside the header") from None
        entries, data_start = parse_safetensors_header(first8, lambda _: raw, n, "body")
        loader = weights.streamed_load(entries, data_start, n)
    except BaseException:
        await drain(content)  # read what the client still sends, so it gets the answer
        raise

    loop = asyncio.get_running_loop()
    chunks: queue.SimpleQueue = queue.SimpleQueue()
    room = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

    def load() -> int:
        error = None
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if error is None:
                try:
                    loader.feed(item)
                except Exception as e:  # noqa: BLE001 - keep consuming so the reader never blocks
                    error = e
            loop.call_soon_threadsafe(room.release)
        if error is not None:
            raise error
        return loader.finish()

    done = run_on_worker(load)
    pos = data_start
    try:
        while pos < n:
            chunk = await content.readany()
            if not chunk:
                break
            await room.acquire()
            chunks.put(chunk)
            pos += len(chunk)
    except asyncio.CancelledError:  # the handler is cancelled (client gone): end the worker's job
        chunks.put(ConnectionResetError("body: the client went away mid-body"))
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it
        raise
    except Exception as e:  # noqa: BLE001 - aiohttp raises when the connection breaks mid-body
        chunks.put(BadRequest(f"body: broken off after {pos} of {n} bytes ({type(e).__name__})"))
    else:
        chunks.put(None if pos == n else BadRequest(f"body: Content-Length is {n} but the body ended after {pos} bytes"))
    return await done
