"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def write_atomic(path: str, write: Callable[[BinaryIO], None]) -> str:
    """Calls ``write`` on a temporary binary file in ``path``'s directory, fsyncs it, then renames it.

    Returns:
        ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str, text: str) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`); returns ``path``."""
    return write_atomic(path, lambda f: f.write(text.encode()))
