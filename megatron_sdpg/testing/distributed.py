"""Run a function on N local ranks with a real process group and a hard timeout.

Used by the multi-process tests and benchmarks: each rank is a fresh ``spawn``
process with ``torch.distributed`` initialised (gloo on CPU), so the code under
test runs exactly as it does under ``torchrun``. A rank that raises fails the
whole call with that rank's traceback; a rank that hangs (the usual symptom of
diverging collectives) fails it with ``TimeoutError`` once ``timeout`` seconds
have passed, and every rank is killed. Nothing ever waits forever.

Example::

    def _body(rank, world_size, scale):
        import torch.distributed as dist
        t = torch.ones(1) * rank * scale
        dist.all_reduce(t)
        return t.item()

    assert run_on_ranks(_body, 2, 3.0) == [3.0, 3.0]

``fn`` must be importable by the child (defined at module level).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import random
import socket
import sys
import time
import traceback
from typing import Any, Callable


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive TCP ports on 127.0.0.1 that were all free a moment ago.

    Ports come from below Linux's ephemeral range (32768-60999): a port the kernel
    hands out itself (``bind(0)``) can be taken again as the source port of any
    outgoing connection before the server binds it (seen: an engine failing with
    "address already in use" on ``base_port + 1``). Each candidate run is checked by
    binding every port of it at once.
    """
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32700 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found on 127.0.0.1")


def _child(fn, rank, world_size, port, backend, args, env, result_queue, timeout):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            _teardown()
        # Plain pickle: tensors travel by value, not as shared memory that dies with this process.
        result_queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result_queue.put((rank, "error", traceback.format_exc()))


def _teardown() -> None:
    import torch.distributed as dist

    # Only a rank that used megatron can have its model-parallel state set up;
    # importing megatron (~5 s) just to find that out would dominate small tests.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    daemon: bool = True,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    Args:
        fn: A module-level function; its return value must be picklable.
        world_size: Number of ranks (1 to 4 on the CPU machines).
        *args: Extra picklable arguments passed to every rank.
        timeout: Seconds for the whole call; past it every rank is killed.
        backend: ``gloo`` (CPU) or ``nccl``.
        env: Extra environment variables for the ranks.
        daemon: Start the ranks as daemonic processes. Pass False when the code
            under test starts processes of its own (megatron's
            ``dist_checkpointing`` starts a multiprocessing manager); every rank
            is still killed on timeout or error.

    Returns:
        The return values, indexed by rank.

    Raises:
        RuntimeError: A rank raised or died; the message holds its traceback.
        TimeoutError: Some rank did not finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    child_env.update(env or {})
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, port, backend, args, child_env, result_queue, timeout),
            daemon=daemon,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s "
                    f"(a hang in a collective usually means the ranks diverged)"
                )
            try:
                rank, status, payload = result_queue.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        result_queue.close()
    return [results[r] for r in range(world_size)]


def run_single(fn: Callable[..., Any], *args: Any, timeout: float = 180.0) -> Any:
    """``run_on_ranks`` with one rank; returns that rank's value."""
    return run_on_ranks(fn, 1, *args, timeout=timeout)[0]

