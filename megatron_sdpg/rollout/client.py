"""Async client for SGLang's HTTP API (and our CPU server, which speaks the same subset).

Usage::

    async with AsyncRolloutClient(["http://127.0.0.1:30000"]) as client:
        groups, metrics = await client.generate([[5, 6, 7], [8, 9]], SamplingConfig(max_new_tokens=32), n=4)

``RolloutClient`` wraps it for synchronous callers (the trainer loop).

Each group goes to one engine: the least busy one that is not cooling down
after a failure (client-side balancing), or the single URL of an
``sglang-router``. A failed group (refused or dropped connection, 5xx, timeout,
malformed answer, aborted sample) is retried with exponential backoff, on
another engine when there is one, under the same request ids, so a retried
group replaces its failed attempt and no sample is lost or duplicated. 4xx
answers are not retried. ``on_engine_failure(url)`` (e.g. a launcher's
restart) runs once per failure, serialised per engine; an error it raises fails
the whole batch (e.g. ``EngineRestartedError``: the batch must be redone once the
restarted engine has the current weights).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence

import aiohttp

from megatron_sdpg.rollout.config import SamplingConfig
from megatron_sdpg.rollout.protocol import (
    BinaryBody,
    StreamedBody,
    EngineRestartedError,
    EngineTimeoutError,
    EngineUnavailableError,
    MalformedResponseError,
    RequestRejectedError,
    RolloutError,
    Sample,
    group_request_json,
    parse_prompt_logprobs,
    parse_sample,
    sample_rid,
    sampling_params_json,
)

_RETRYABLE = (EngineUnavailableError, EngineTimeoutError, MalformedResponseError)


class _Engine:
    def __init__(self, url: str, max_inflight: int):
        self.url = url.rstrip("/")
        self.slots = asyncio.Semaphore(max_inflight)
        self.load = 0
        self.down_until = 0.0
        self.failure_lock = asyncio.Lock()


class _StreamedPayload(aiohttp.payload.Payload):
    """aiohttp's view of a ``StreamedBody``: a Content-Length body written piece by piece,
    each write draining the socket buffer before the next (no copy of the whole body)."""

    def __init__(self, body: StreamedBody):
        super().__init__(body, content_type=body.content_type)
        self._size = body.size

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a streamed binary body has no text form")

    async def write(self, writer) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer, content_length: int | None) -> None:
        sent = 0
        for piece in self._value.pieces():
            await writer.write(piece)
            sent += memoryview(piece).nbytes
        if sent != self._size:
            raise ValueError(f"streamed body: {sent} bytes written, {self._size} declared")


class AsyncRolloutClient:
    """Batched ``/generate`` over one or more engines with retries and failover.

    Args:
        urls: Engine (or router) base URLs, e.g. ``http://127.0.0.1:30000``.
        request_timeout_s: Total timeout of one HTTP call.
        connect_timeout_s: TCP connect timeout.
        max_retries: Extra attempts per group after the first.
        backoff_s: First retry delay (doubles per attempt, capped by ``backoff_max_s``).
        backoff_max_s: Cap of the retry delay.
        max_inflight_per_engine: Concurrent requests per engine.
        on_engine_failure: Called with an engine URL after a retryable failure
            there, e.g. to restart it (awaited if async, else run in a thread).

    Attributes:
        expected_weight_version: When set (by the trainer after each sync), a sample an
            engine reports under another weight version fails its batch with
            ``EngineRestartedError`` (e.g. an engine restarted with its initial weights).
    """

    def __init__(
        self,
        urls: Sequence[str],
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_inflight_per_engine: int = 64,
        on_engine_failure: Callable[[str], Awaitable[None] | None] | None = None,
    ):
        if not urls:
            raise ValueError("urls: at least one engine URL is needed")
        self.engines = [_Engine(u, max_inflight_per_engine) for u in urls]
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.on_engine_failure = on_engine_failure
        self.expected_weight_version: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    async def __aenter__(self) -> "AsyncRolloutClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # One pooled session: keep-alive connections, per-host limit from the engine slots.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self.timeout)
        return self._session

    async def close(self, abort: bool = True) -> None:
        """Cancels in-flight calls, asks every engine to abort its requests, closes the pool."""
        pending = [t for t in self._tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if abort and pending:
            await asyncio.gather(*(self._abort_engine(e.url) for e in self.engines), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _abort_engine(self, url: str) -> None:
        try:
            await self.call(url, "POST", "/abort_request", {"abort_all": True}, timeout_s=5.0)
        except RolloutError:
            pass

    async def call(self, url: str, method: str, path: str, body: Any = None, timeout_s: float | None = None, want_json: bool = True) -> Any:
        """One HTTP call to one engine, no retry; errors classified.

        ``body`` is JSON-serialised, sent as is when it is ``bytes`` (already JSON), or
        sent with its own content type when it is a ``BinaryBody`` (``StreamedBody``: piece by piece).

        Raises:
            EngineUnavailableError: Connection refused or dropped, or a 5xx answer.
            EngineTimeoutError: No answer within the timeout.
            RequestRejectedError: A 4xx answer (its message included).
            MalformedResponseError: A 200 answer that is not JSON (when ``want_json``).
        """
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.timeout.sock_connect) if timeout_s else self.timeout
        where = f"{method} {url}{path}"
        if isinstance(body, bytes):  # an already-encoded JSON body
            kwargs: dict[str, Any] = {"data": body, "headers": {"Content-Type": "application/json"}}
        elif isinstance(body, BinaryBody):
            kwargs = {"data": body.data, "headers": {"Content-Type": body.content_type}}
        elif isinstance(body, StreamedBody):
            kwargs = {"data": _StreamedPayload(body)}
        else:
            kwargs = {"json": body}
        try:
            async with self._sess().request(method, url + path, timeout=timeout, **kwargs) as resp:
                raw = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise EngineTimeoutError(f"{where}: no answer within {timeout.total}s") from None
        except aiohttp.ClientConnectorError as e:
            raise EngineUnavailableError(f"{where}: cannot connect ({e.os_error or e})") from None
        except (aiohttp.ClientError, ConnectionError) as e:
            raise EngineUnavailableError(f"{where}: connection failed ({type(e).__name__}: {e})") from None
        text = raw.decode("utf-8", "replace")
        if status >= 500:
            raise EngineUnavailableError(f"{where}: HTTP {status}: {text[:300]}")
        if status >= 400:
            raise RequestRejectedError(f"{where}: HTTP {status}: {text[:300]}")
        if not want_json:
            return text
        try:
            import json

            return json.loads(raw)
        except ValueError:
            raise MalformedResponseError(f"{where}: answer is not JSON: {text[:200]!r}") from None

    def _pick(self, avoid: set[str]) -> _Engine:
        now = time.monotonic()
        ranked = sorted(self.engines, key=lambda e: (e.down_until > now, e.url in avoid, e.load))
        return ranked[0]

    async def _failed(self, engine: _Engine, attempt: int) -> None:
        engine.down_until = time.monotonic() + min(self.backoff_s * 2**attempt, self.backoff_max_s)
        if self.on_engine_failure is None:
            return
        async with engine.failure_lock:
            if asyncio.iscoroutinefunction(self.on_engine_failure):
                await self.on_engine_failure(engine.url)
            else:  # a blocking hook (e.g. a restart) must not stall the other requests
                await asyncio.to_thread(self.on_engine_failure, engine.url)

    async def with_failover(self, what: str, fn: Callable[[str], Awaitable[Any]]) -> Any:
        """Runs ``fn(url)`` on the best engine, retrying retryable failures elsewhere."""
        errors: list[str] = []
        last: Exception | None = None
        tried: set[str] = set()
        for attempt in range(self.max_retries + 1):
            engine = self._pick(tried)
            wait = engine.down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            engine.load += 1
            try:
                async with engine.slots:
                    return await fn(engine.url)
            except _RETRYABLE as e:
                errors.append(f"attempt {attempt + 1} on {engine.url}: {e}")
                last = e
                tried.add(engine.url)
                if len(tried) == len(self.engines):
                    tried.clear()
                await self._failed(engine, attempt)
            finally:
                engine.load -= 1
        assert last is not None
        raise type(last)(f"{what} failed after {self.max_retries + 1} attempts: " + "; ".join(errors))

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        n: int = 1,
        return_logprob: bool = True,
        seed: int | None = None,
        batch_id: str | None = None,
    ) -> tuple[list[list[Sample]], dict[str, float]]:
        """Samples ``n`` completions for every prompt.

        Args:
            prompts: Token ids of each prompt.
            sampling: Sampling parameters; ``sampling.seed`` unless ``seed`` is given.
            n: Samples per prompt (a group).
            return_logprob: Ask for per-token log-probs of the outputs.
            seed: Base seed; sample k of group g gets ``seed + g * n + k``.
            batch_id: Prefix of the request ids (default: random).

        Returns:
            ``(groups, metrics)``: ``groups[g][k]`` is sample k of prompt g;
            metrics has ``rollout/gen_time_s``, ``rollout/tokens_per_s``, token counts and retries.
        """
        batch_id = batch_id or uuid.uuid4().hex[:12]
        seed = sampling.seed if seed is None else seed
        start = time.perf_counter()
        attempts = [0]

        async def one_group(g: int) -> list[Sample]:
            rids = [sample_rid(batch_id, g, k) for k in range(n)]
            params = [sampling_params_json(sampling, None if seed is None else seed + g * n + k) for k in range(n)]
            body = group_request_json(prompts[g], rids, params, return_logprob)

            async def on(url: str) -> list[Sample]:
                attempts[0] += 1
                out = await self.call(url, "POST", "/generate", body)
                if not isinstance(out, list) or len(out) != n:
                    got = f"{len(out)} items" if isinstance(out, list) else type(out).__name__
                    raise MalformedResponseError(f"/generate at {url} for group {g}: expected a list of {n} items, got {got}")
                samples = [parse_sample(o, url, rids[k], g, k, prompts[g], return_logprob) for k, o in enumerate(out)]
                aborted = [s.rid for s in samples if s.finish_reason == "abort"]
                if aborted:
                    raise EngineUnavailableError(f"{url} aborted {aborted[0]} (e.g. a weight update or shutdown)")
                want = self.expected_weight_version
                stale = [s for s in samples if want is not None and s.weight_version not in (None, want)]
                if stale:
                    raise EngineRestartedError(f"{url} generated {stale[0].rid} with weight version "
                                               f"{stale[0].weight_version!r}, not the synced {want!r}")
                return samples

            return await self.with_failover(f"group {g} (rids {rids[0]}..)", on)

        tasks = [self._spawn(one_group(g)) for g in range(len(prompts))]
        try:
            groups = await asyncio.gather(*tasks)
        except BaseException:  # the batch has failed: its other groups need not run on
            for t in tasks:
                t.cancel()
            raise
        elapsed = time.perf_counter() - start
        samples = [s for grp in groups for s in grp]
        completion = sum(len(s.output_ids) for s in samples)
        metrics = {
            "rollout/gen_time_s": elapsed,
            "rollout/tokens_per_s": completion / elapsed if elapsed > 0 else 0.0,
            "rollout/completion_tokens": float(completion),
            "rollout/prompt_tokens": float(sum(len(p) for p in prompts) * n),
            "rollout/samples": float(len(samples)),
            "rollout/finish_stop_frac": sum(s.finish_reason == "stop" for s in samples) / max(len(samples), 1),
            "rollout/retries": float(attempts[0] - len(prompts)),
        }
        return list(groups), metrics

    async def prompt_logprobs(self, url: str, prompt_ids: Sequence[int]) -> list[float]:
        """One engine's log-probs of ``prompt_ids[1:]`` given their prefixes, ``[p-1]`` (no temperature)."""
        rid = f"probe-{uuid.uuid4().hex[:12]}"
        body = {
            "input_ids": [int(t) for t in prompt_ids],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "rid": rid,
        }
        out = await self.call(url, "POST", "/generate", body)
        return parse_prompt_logprobs(out, url, rid, prompt_ids)

    async def healthy(self, url: str, generate: bool = False, timeout_s: float = 10.0) -> bool:
        """True when ``/health`` (or ``/health_generate``) answers 200."""
        try:
            await self.call(url, "GET", "/health_generate" if generate else "/health", timeout_s=timeout_s, want_json=False)
            return True
        except RolloutError:
            return False

    async def wait_healthy(self, timeout_s: float = 120.0) -> None:
        """Waits until every engine answers ``/health``.

        Raises:
            EngineTimeoutError: Some engine is still down after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        for url in self.urls:
            while not await self.healthy(url, timeout_s=5.0):
                if time.monotonic() > deadline:
                    raise EngineTimeoutError(f"{url}: not healthy after {timeout_s:.0f}s")
                await asyncio.sleep(0.2)

    async def post_all(self, path: str, body: dict[str, Any] | bytes | BinaryBody | StreamedBody, timeout_s: float | None = None) -> list[Any]:
        """POSTs ``body`` to every engine at once (weight updates, versions); SGLang's
        ``{"success": false}`` answers come back as ``RequestRejectedError``."""
        return list(await asyncio.gather(*(self.call(u, "POST", path, body, timeout_s=timeout_s) for u in self.urls)))

    async def flush_cache(self, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:
        """``/flush_cache`` on every engine, asked again until it is done.

        SGLang answers 400 (and flushes nothing) while requests are running or waiting,
        so a busy engine is asked again, the wait doubling from ``poll_s`` up to 1 s.

        Raises:
            EngineTimeoutError: An engine still answers busy after ``timeout_s``.
        """
        await asyncio.gather(*(self._flush_one(u, timeout_s, poll_s) for u in self.urls))

    async def _flush_one(self, url: str, timeout_s: float, poll_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        wait = poll_s
        while True:
            try:
                await self.call(url, "POST", "/flush_cache", want_json=False)
                return
            except RequestRejectedError as e:
                if time.monotonic() + wait > deadline:
                    raise EngineTimeoutError(f"{url}/flush_cache: still busy after {timeout_s:.0f}s ({e})") from None
            await asyncio.sleep(wait)
            wait = min(2 * wait, 1.0)

    async def release_memory_occupation(self, tags: Sequence[str] | None = None,
                                        timeout_s: float | None = None) -> list[Any]:
        """``/release_memory_occupation`` on every engine (``tags``: ``weights``, ``kv_cache``,
        ``cuda_graph``; ``None`` = all): colocated engines free their memory for the training passes.
        Returns each engine's answer (SGLang's is empty; the CPU server reports its resident memory)."""
        return await self._memory_call("/release_memory_occupation", tags, timeout_s)

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None,
                                       timeout_s: float | None = None) -> list[Any]:
        """``/resume_memory_occupation`` on every engine; released weights come back without their
        contents (unless SGLang keeps a CPU backup), so a weight update must follow."""
        return await self._memory_call("/resume_memory_occupation", tags, timeout_s)

    async def _memory_call(self, path: str, tags: Sequence[str] | None, timeout_s: float | None) -> list[Any]:
        body = {"tags": None if tags is None else list(tags)}
        answers = await asyncio.gather(*(self.call(u, "POST", path, body, timeout_s=timeout_s, want_json=False)
                                         for u in self.urls))
        out = []
        for text in answers:
            try:
                out.append(json.loads(text) if text.strip() else None)
            except ValueError:
                out.append(None)
        return out

    async def model_info(self, url: str) -> dict[str, Any]:
        return await self.call(url, "GET", "/model_info")
