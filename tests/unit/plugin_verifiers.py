"""Verifier plugins used by the reward tests (importable as ``tests.unit.plugin_verifiers``)."""

import os
import time


def sleepy(response: str, answer: str) -> bool:
    """Sleeps ``float(response)`` seconds, then says whether response == answer."""
    time.sleep(float(response))
    return response == answer


def raises(response: str, answer: str) -> bool:
    raise RuntimeError("verifier bug")


def dies(response: str, answer: str) -> bool:
    os._exit(3)


def spins(response: str, answer: str) -> bool:
    while True:
        pass


def mostly_uniform(response: str, answer: str) -> bool:
    """Wrong on every response to a problem with an odd answer (its group is uniform and dropped
    by dynamic sampling); on even answers right for about half the responses (by a hash of the text)."""
    import zlib

    return int(answer) % 2 == 0 and zlib.crc32(response.encode()) % 2 == 0
