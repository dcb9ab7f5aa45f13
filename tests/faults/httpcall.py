"""Plain HTTP calls for the fault tests (stdlib only, every call bounded by a timeout)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def call(url: str, path: str, body: Any = None, raw: bytes | None = None, timeout: float = 60.0,
         method: str | None = None) -> tuple[int, Any]:
    """``(status, parsed JSON or text)`` of one request; ``raw`` is sent as is (e.g. NaN literals)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
