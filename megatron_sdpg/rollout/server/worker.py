"""The CPU server's model worker: the one thread that touches the model.

Jobs run in arrival order; consecutive ``/generate`` jobs waiting in the queue
are merged into one batch (at most ``max_batch`` samples). Before a batch starts
the worker waits for more jobs while they keep coming (``gather_s`` after the
last arrival, at most ``gather_max_s`` in all): a trainer's rollout arrives as one
HTTP request per group within a few milliseconds, and without the wait the first
group ran alone before the others (a 128-row batch ran as 8 + 120 rows, nearly
doubling its decode steps' cost; SGLang joins late requests into the running batch
instead, which this engine does not do). The worker outlives
anything a job or its waiter does:

* a job whose future was cancelled before it started (a ``/health_generate``
  that timed out, a closed connection) is skipped, and a future cancelled later
  is never resolved twice;
* a merged batch that raises is rerun job by job, so only the job that caused
  the error fails;
* an unexpected error fails the jobs at hand and the loop goes on.

``alive()`` tells ``/health`` whether the thread still runs; ``ready()`` (the
weights' state) is checked before every batch, so no batch runs on weights a
broken update left half-written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from megatron_sdpg.rollout.server.generator import BatchGenerator, SampleResult
from megatron_sdpg.rollout.server.requests import BadRequest, SampleRequest


class EngineNotReady(RuntimeError):
    """The engine cannot serve now (queue full, weights half-written); the route answers 503."""


@dataclass
class _Job:
    fn: Callable[..., Any] | None = None  # a control job
    reqs: list[SampleRequest] = field(default_factory=list)  # a generate job
    epoch: int = 0
    tokens: int = 0  # prompt + max_new_tokens of every sample (counted against max_queued_tokens)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def _resolve(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Sets a job's outcome unless its waiter cancelled it meanwhile."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by its waiter: nobody wants the outcome


class ModelWorker:
    """Runs generate batches and control jobs on one thread.

    Args:
        generator: Runs batches.
        max_batch: Most samples merged into one batch.
        max_queued_tokens: Most prompt + ``max_new_tokens`` tokens queued or running at once.
        ready: Returns ``None`` when the weights may be served, else why not.
        gather_s: How long a batch that could take more samples waits for the next
            ``/generate`` job after the last one arrived (0: start at once).
        gather_max_s: Longest such wait in all, from the first job taken.
    """

    def __init__(self, generator: BatchGenerator, max_batch: int = 256, max_queued_tokens: int = 1 << 22,
                 ready: Callable[[], str | None] = lambda: None, gather_s: float = 0.005, gather_max_s: float = 0.05):
        self.generator = generator
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.gather_max_s = gather_max_s
        self.max_queued_tokens = max_queued_tokens
        self.ready = ready
        self.abort_epoch = 0
        self.aborted_rids: set[str] = set()
        self.queued_tokens = 0
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit_generate(self, reqs: list[SampleRequest]) -> concurrent.futures.Future:
        """Queues a generate job.

        Raises:
            BadRequest: The job alone is over ``max_queued_tokens``.
            EngineNotReady: The queue holds too many tokens now (retry later).
        """
        tokens = sum(len(r.input_ids) + r.max_new_tokens for r in reqs)
        if tokens > self.max_queued_tokens:
            raise BadRequest(f"body: asks for {tokens} tokens (prompts + max_new_tokens), above the server's "
                             f"limit --max-queued-tokens {self.max_queued_tokens}")
        with self._cv:
            if self.queued_tokens + tokens > self.max_queued_tokens:
                raise EngineNotReady(f"queue full: {self.queued_tokens} tokens queued, limit --max-queued-tokens "
                                     f"{self.max_queued_tokens}; retry later")
            self.queued_tokens += tokens
        return self._push(_Job(reqs=reqs, epoch=self.abort_epoch, tokens=tokens))

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        return self._push(_Job(fn=fn))

    def abort(self, rid: str | None, abort_all: bool) -> None:
        if abort_all:
            self.abort_epoch += 1
        elif rid:
            self.aborted_rids.add(rid)

    def _push(self, job: _Job) -> concurrent.futures.Future:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def _next_batch(self) -> list[_Job]:
        """The next control job, or the next run of generate jobs merged up to ``max_batch`` samples."""
        with self._cv:
            while not self._jobs:
                self._cv.wait()
            batch = [self._jobs.popleft()]
            if batch[0].fn is None:
                size = len(batch[0].reqs)
                deadline = time.monotonic() + self.gather_max_s
                while True:
                    while self._jobs and self._jobs[0].fn is None and size + len(self._jobs[0].reqs) <= self.max_batch:
                        size += len(self._jobs[0].reqs)
                        batch.append(self._jobs.popleft())
                    wait = min(self.gather_s, deadline - time.monotonic())
                    if self._jobs or size >= self.max_batch or wait <= 0:
                        break  # the next job does not fit (or is a control job), the batch is full, or time is up
                    if not self._cv.wait_for(lambda: bool(self._jobs), timeout=wait):
                        break  # nothing more arrived within gather_s
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                live = [j for j in batch if j.future.set_running_or_notify_cancel()]  # skip cancelled jobs
                if not live:
                    continue
                if live[0].fn is not None:
                    self._run_control(live[0])
                else:
                    self._run_generate(live)
            except BaseException as e:  # noqa: BLE001 - the worker must outlive any job
                for j in batch:
                    _resolve(j.future, error=e)
            finally:
                with self._cv:
                    self.queued_tokens -= sum(j.tokens for j in batch)

    @staticmethod
    def _run_control(job: _Job) -> None:
        try:
            result = job.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            _resolve(job.future, error=e)
        else:
            _resolve(job.future, result)

    def _run_generate(self, jobs: list[_Job]) -> None:
        reason = self.ready()
        if reason is not None:
            for j in jobs:
                _resolve(j.future, error=EngineNotReady(reason))
            return
        try:
            results = self._generate(jobs)
        except Exception as e:  # noqa: BLE001
            if len(jobs) == 1:
                _resolve(jobs[0].future, error=e)
                return
            for j in jobs:  # one job's fault must not fail the jobs merged with it
                self._run_generate([j])
            return
        pos = 0
        for j in jobs:
            _resolve(j.future, results[pos : pos + len(j.reqs)])
            pos += len(j.reqs)

    def _generate(self, jobs: list[_Job]) -> list[SampleResult]:
        reqs = [r for j in jobs for r in j.reqs]
        epoch_of = {id(r): j.epoch for j in jobs for r in j.reqs}
        by_rid = {r.rid: r for r in reqs}

        def aborted(rid: str) -> bool:
            return rid in self.aborted_rids or epoch_of[id(by_rid[rid])] != self.abort_epoch

        def abort_pending() -> bool:  # before every decode step: no per-row work unless an abort came in
            return bool(self.aborted_rids) or any(j.epoch != self.abort_epoch for j in jobs)

        results = self.generator.generate(reqs, aborted, abort_pending)
        self.aborted_rids.difference_update(by_rid)
        return results
