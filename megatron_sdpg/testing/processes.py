"""Process helpers for tests that start whole runs (torchrun ranks, engines in their own sessions)."""

from __future__ import annotations

import signal

import psutil


def kill_tree(pid: int, timeout: float = 30.0) -> None:
    """SIGKILLs ``pid`` and every descendant (engines run in their own sessions, so a
    process-group kill would miss them), by PID, and waits up to ``timeout`` seconds."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
