"""``/update_weights_from_tensor`` with a raw safetensors body, loaded while it arrives.

The event loop reads the body: first the header, which is checked against the
model (names, shapes, offsets) before any data is read; then the data chunks,
which it hands to the model worker, which copies them into the parameters
(``StreamedLoad``). Receiving and copying thus overlap on two threads, no buffer
of the whole bucket is allocated, and each byte is copied once after the socket.
Chunks cross threads in batches (``_Handoff``), at most ``BATCHES_IN_FLIGHT``
waiting for the worker (TCP backpressure beyond).
"""

from __future__ import annotations

import asyncio
import queue
import struct
from typing import Any, Callable, Iterator

from aiohttp import web

from megatron_sdpg.rollout.server.requests import BadRequest
from megatron_sdpg.rollout.server.weights import ModelWeights
from megatron_sdpg.weights.tensor_codec import parse_safetensors_header

BATCH_BYTES = 4 * 2**20  # aiohttp hands over the socket's reads (<= 256 KiB each); they cross threads in batches
BATCHES_IN_FLIGHT = 8


def query_options(request: web.Request) -> dict[str, Any]:
    """Options given in the query string; ``true``/``false`` become booleans."""
    return {k: {"true": True, "false": False}.get(v, v) for k, v in request.query.items()}


async def drain(content) -> None:
    """Reads and drops the rest of a body (a client still sending would not see the answer)."""
    while await content.readany():
        pass


class _Handoff:
    """Batches of body chunks from the event loop to the model worker.

    Each cross-thread wake-up costs a system call, so chunks travel in batches of
    about ``BATCH_BYTES``, and the worker wakes the loop only when the loop waits
    for room (``BATCHES_IN_FLIGHT`` batches not yet copied).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.batch: list[bytes] = []
        self.batch_bytes = 0
        self.sent = 0  # written by the loop only
        self.taken = 0  # written by the worker only
        self.room = asyncio.Event()
        self.loop_waiting = False

    async def put(self, chunk: bytes) -> None:
        """Loop side: queues a chunk (waits while the worker is too far behind)."""
        self.batch.append(chunk)
        self.batch_bytes += len(chunk)
        if self.batch_bytes >= BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self.batch:
            return
        while self.sent - self.taken >= BATCHES_IN_FLIGHT:
            self.room.clear()
            self.loop_waiting = True
            if self.sent - self.taken >= BATCHES_IN_FLIGHT:  # re-check: the worker may have just taken one
                await self.room.wait()
            self.loop_waiting = False
        self.queue.put(self.batch)
        self.sent += 1
        self.batch, self.batch_bytes = [], 0

    def end(self, outcome: BaseException | None) -> None:
        """Loop side: the body is complete (``None``; after ``flush``) or failed (the worker raises it)."""
        self.queue.put(outcome)

    def chunks(self) -> Iterator[bytes]:
        """Worker side: the chunks in order; raises the failure ``end`` was given."""
        while (batch := self.queue.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            yield from batch
            self.taken += 1
            if self.loop_waiting:
                self.loop.call_soon_threadsafe(self.room.set)


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

    handoff = _Handoff(asyncio.get_running_loop())

    def load() -> int:
        error = None
        for chunk in handoff.chunks():
            if error is None:
                try:
                    loader.feed(chunk)
                except Exception as e:  # noqa: BLE001 - keep consuming so the reader never blocks
                    error = e
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
            await handoff.put(chunk)
            pos += len(chunk)
        await handoff.flush()
    except asyncio.CancelledError:  # the handler is cancelled (client gone): end the worker's job
        handoff.end(ConnectionResetError("body: the client went away mid-body"))
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it
        raise
    except Exception as e:  # noqa: BLE001 - aiohttp raises when the connection breaks mid-body
        handoff.end(BadRequest(f"body: broken off after {pos} of {n} bytes ({type(e).__name__})"))
    else:
        handoff.end(None if pos == n else BadRequest(f"body: Content-Length is {n} but the body ended after {pos} bytes"))
    return await done
