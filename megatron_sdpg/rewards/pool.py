"""Verifier calls in killable worker processes, each under a wall-clock timeout.

A pathological response (a regex or sympy call that runs for minutes, a
multi-megabyte string) must never hang or crash the trainer. Every call runs in a
worker of a ``pebble.ProcessPool`` started with ``forkserver`` (clean children that
inherit none of the trainer's threads, and which has the verifier imported); a call past ``timeout_s`` has its worker
killed and replaced, and gets the failure reward. A call that raises, or whose
worker dies, gets the failure reward too. Both are counted in the returned batch.

Usage::

    with VerifierPool("numeric", RewardConfig(timeout_s=2.0)) as pool:
        batch = pool.score(["... \\\\boxed{168}"], ["168"])
        batch.rewards, batch.timeouts
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import pebble

from megatron_sdpg.rewards.config import RewardConfig
from megatron_sdpg.rewards.registry import resolve_verifier, verifier_path

log = logging.getLogger(__name__)

_WORKER_CACHE: dict = {}


def _init_worker(path: str) -> None:
    """Worker start-up: import the verifier before any call is timed (sympy takes seconds)."""
    try:
        _WORKER_CACHE[path] = resolve_verifier(path)
    except ValueError:
        pass  # reported per call by _verify_in_worker


def _verify_in_worker(path: str, response: str, answer: str) -> bool:
    """Worker-side call: resolve (once per worker) and run the verifier."""
    fn = _WORKER_CACHE.get(path)
    if fn is None:
        fn = _WORKER_CACHE[path] = resolve_verifier(path)
    return bool(fn(response, answer))


@dataclass
class RewardBatch:
    """Rewards of one batch of responses.

    Attributes:
        rewards: One reward per response.
        correct: Whether each response was verified correct (False on failure).
        timeouts: Calls killed at the timeout.
        errors: Calls that raised or whose worker died.
        first_error: Message of the first error, for the log.
    """

    rewards: list[float]
    correct: list[bool]
    timeouts: int = 0
    errors: int = 0
    first_error: str = ""

    def metrics(self) -> dict[str, float]:
        """Scalars for the training log."""
        n = max(1, len(self.rewards))
        return {
            "reward/mean": sum(self.rewards) / n,
            "reward/accuracy": sum(self.correct) / n,
            "reward/verifier_timeouts": float(self.timeouts),
            "reward/verifier_errors": float(self.errors),
        }


class VerifierPool:
    """A pool of worker processes scoring responses with one verifier.

    Args:
        verifier: Built-in verifier name or plugin path ``package.module:function``.
        config: Rewards, timeout, worker count, response length cap.

    Raises:
        ValueError: the verifier cannot be resolved (checked in this process first).
    """

    def __init__(self, verifier: str, config: RewardConfig | None = None):
        self.config = config or RewardConfig()
        self.path = verifier_path(verifier)
        resolve_verifier(self.path)
        context = multiprocessing.get_context("forkserver")
        # Workers replacing killed ones fork from the server: have it import the
        # verifier once so a restart costs milliseconds, not a sympy import. (No effect
        # if this process's fork server is already running.)
        context.set_forkserver_preload([__name__, self.path.partition(":")[0]])
        self._pool = pebble.ProcessPool(
            max_workers=self.config.workers, context=context, initializer=_init_worker, initargs=(self.path,)
        )

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> RewardBatch:
        """Verifies ``responses[i]`` against ``answers[i]`` for all i, in parallel.

        Never raises for a bad response and never waits much past
        ``timeout_s * ceil(len / workers)`` (plus a fixed margin for worker restarts).
        """
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        cfg = self.config
        futures = [
            self._pool.schedule(
                _verify_in_worker, (self.path, r[-cfg.max_response_chars :], a), timeout=cfg.timeout_s
            )
            for r, a in zip(responses, answers)
        ]
        deadline = time.monotonic() + cfg.timeout_s * math.ceil(len(futures) / cfg.workers) + 30.0
        batch = RewardBatch(rewards=[], correct=[])
        for future in futures:
            ok, failed = False, True
            try:
                ok, failed = bool(future.result(timeout=max(0.0, deadline - time.monotonic()))), False
            except FutureTimeout:  # killed by the pool at timeout_s, or past the batch deadline
                future.cancel()
                batch.timeouts += 1
            except Exception as err:  # the verifier raised or its worker died
                batch.errors += 1
                batch.first_error = batch.first_error or f"{type(err).__name__}: {err}"[:300]
            reward = cfg.reward_on_failure if failed else (cfg.correct_reward if ok else cfg.wrong_reward)
            batch.rewards.append(reward)
            batch.correct.append(ok)
        if batch.timeouts or batch.errors:
            log.warning(
                "verifier %s: %d timeouts, %d errors in %d calls (first error: %s)",
                self.path, batch.timeouts, batch.errors, len(futures), batch.first_error or "-",
            )
        return batch

    def close(self) -> None:
        """Stops the workers: lets idle ones exit cleanly, kills any still busy after 5 s."""
        self._pool.close()
        try:
            self._pool.join(timeout=5)
        except TimeoutError:
            self._pool.stop()
            self._pool.join(timeout=5)

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
