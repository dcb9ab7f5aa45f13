"""Atomic writes of problem files (jsonl or parquet): a temporary file, fsync, then rename."""

from __future__ import annotations

import json

from megatron_sdpg.utils.files import write_atomic


def write_rows(path: str, rows: list[dict]) -> None:
    """Writes ``rows`` to ``path`` (``.jsonl``/``.json`` one object a line, or ``.parquet``).

    The file appears complete or not at all: rows go to a temporary file in the same
    directory, which is fsynced and renamed over ``path``.

    Raises:
        ValueError: the extension is neither jsonl/json nor parquet.
    """
    if not path.endswith((".jsonl", ".json", ".parquet")):
        raise ValueError(f"{path}: output must end in .jsonl, .json or .parquet")

    def write(f) -> None:
        if path.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), f)
        else:
            for row in rows:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())

    write_atomic(path, write)
