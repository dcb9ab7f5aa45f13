"""A loopback HTTP proxy that records every request on its way to a real engine.

The contract tests put it between our client (and weight-sync strategies) and the
CPU server, run the real flows, and then check each recorded body against SGLang's
request classes. Answers come from the real server, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from megatron_sdpg.testing.distributed import free_port


@dataclass
class Recorded:
    """One request: method, path, query parameters, content type and the JSON body (``None`` if not JSON)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any


class RecordingProxy:
    """Forwards ``http://127.0.0.1:<port>/...`` to ``upstream`` and keeps a ``Recorded`` of each request.

    Args:
        upstream: Base URL of the real engine.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[Recorded] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="recording-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("recording proxy did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _forward(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = None
        if request.content_type == "application/json" and raw:
            body = json.loads(raw)
        self.requests.append(Recorded(request.method, request.path, dict(request.query), request.content_type, body))
        headers = {"Content-Type": request.headers["Content-Type"]} if "Content-Type" in request.headers else {}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=raw or None,
                                         headers=headers) as resp:
            data = await resp.read()
            return web.Response(body=data, status=resp.status, content_type=resp.content_type)

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies sent to ``path``, in order."""
        return [r.body for r in self.requests if r.path == path]

    def close(self) -> None:
        async def stop() -> None:
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
