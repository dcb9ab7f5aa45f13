"""Atomic writes of problem files (jsonl or parquet): a temporary file, fsync, then rename."""

from __future__ import annotations

import json
import os
import tempfile


def write_rows(path: str, rows: list[dict]) -> None:
    """Writes ``rows`` to ``path`` (``.jsonl``/``.json`` one object a line, or ``.parquet``).

    The file appears complete or not at all: rows go to a temporary file in the same
    directory, which is fsynced and renamed over ``path``.

    Raises:
        ValueError: the extension is neither jsonl/json nor parquet.
    """
    if not path.endswith((".jsonl", ".json", ".parquet")):
        raise ValueError(f"{path}: output must end in .jsonl, .json or .parquet")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".parquet"):
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(rows), f)
            else:
                for row in rows:
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
