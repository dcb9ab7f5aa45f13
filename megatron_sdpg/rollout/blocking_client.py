"""``RolloutClient``: the async client behind a synchronous API, for the trainer loop.

The async client and its connection pool live on one event loop in a daemon
thread for the client's whole life, so pooled keep-alive connections survive
between calls (``asyncio.run`` per call would rebuild the pool every step).

Usage::

    with RolloutClient.from_config(cfg.rollout, urls) as client:
        groups, metrics = client.generate(prompts, n=cfg.rollout.n_samples)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from megatron_sdpg.rollout.client import AsyncRolloutClient
from megatron_sdpg.rollout.config import RolloutConfig, SamplingConfig
from megatron_sdpg.rollout.protocol import Sample

T = TypeVar("T")


class RolloutClient:
    """Synchronous facade of ``AsyncRolloutClient`` (same arguments, plus a default ``sampling``)."""

    def __init__(self, urls: Sequence[str], sampling: SamplingConfig | None = None, **kwargs: Any):
        self.sampling = sampling or SamplingConfig()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client", daemon=True)
        self._thread.start()
        self.aclient: AsyncRolloutClient = self.run(self._make(urls, kwargs))

    @staticmethod
    async def _make(urls: Sequence[str], kwargs: dict[str, Any]) -> AsyncRolloutClient:
        return AsyncRolloutClient(urls, **kwargs)

    @classmethod
    def from_config(cls, cfg: RolloutConfig, urls: Sequence[str] | None = None,
                    on_engine_failure: Callable[[str], Any] | None = None) -> "RolloutClient":
        """A client for ``urls`` (default ``cfg.urls``) with the config's timeouts and retries."""
        return cls(
            list(urls or cfg.urls),
            sampling=cfg.sampling,
            request_timeout_s=cfg.request_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            backoff_max_s=cfg.backoff_max_s,
            max_inflight_per_engine=cfg.max_inflight_per_engine,
            on_engine_failure=on_engine_failure,
        )

    @property
    def urls(self) -> list[str]:
        return self.aclient.urls

    def run(self, coro: Awaitable[T], timeout_s: float | None = None) -> T:
        """Runs a coroutine on the client's loop and returns its result."""
        return self.submit(coro).result(timeout_s)

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future:
        """Starts a coroutine on the client's loop; the caller waits on the future when it likes."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, sampling: SamplingConfig | None = None,
                 **kwargs: Any) -> tuple[list[list[Sample]], dict[str, float]]:
        """See ``AsyncRolloutClient.generate``."""
        return self.run(self.aclient.generate(prompts, sampling or self.sampling, n=n, **kwargs))

    def prompt_logprobs(self, url: str, prompt_ids: Sequence[int]) -> list[float]:
        return self.run(self.aclient.prompt_logprobs(url, prompt_ids))

    def post_all(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> list[Any]:
        return self.run(self.aclient.post_all(path, body, timeout_s))

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        self.run(self.aclient.wait_healthy(timeout_s))

    def close(self) -> None:
        """Aborts in-flight requests on the engines, closes the pool, stops the loop thread."""
        if not self._loop.is_running():
            return
        self.run(self.aclient.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
