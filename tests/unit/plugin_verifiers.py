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
