"""A verifier plugin for the solution-generator tests (``tests.e2e.solution_verifiers:third``)."""

import zlib


def third(response: str, answer: str) -> bool:
    """Accepts about a third of non-empty responses, by a hash of the stripped text."""
    text = response.strip()
    return bool(text) and zlib.crc32(text.encode()) % 3 == 0
