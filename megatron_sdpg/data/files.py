"""Problems from jsonl / parquet files, read with Hugging Face ``datasets``.

Every row is checked; a bad row (missing answer, empty prompt, wrong type, prompt
longer than the limit) either stops loading with a one-line error naming the file
and the row (0-based), or, with ``skip_bad_rows``, is skipped and counted, and the
counts are logged per file. Nothing is dropped silently.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_sdpg.data.problem import Problem

log = logging.getLogger(__name__)


class BadRowError(ValueError):
    """A row cannot become a problem; the message names file and row."""


@dataclass
class LoadReport:
    """What loading one file did.

    Attributes:
        path: The file.
        rows: Rows read.
        kept: Rows that became problems.
        skipped: Skipped rows per reason (only with ``skip_bad_rows``).
    """

    path: str
    rows: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class Columns:
    """Where the fields of a problem are in a row (see ``DataConfig``)."""

    question: str = "question"
    answer: str = "answer"
    context: str = "solution"
    id: str = ""
    context_marker: str = ""


def _format(path: str) -> str:
    if path.endswith((".jsonl", ".json")):
        return "json"
    if path.endswith(".parquet"):
        return "parquet"
    raise BadRowError(f"{path}: unknown file type (expected .jsonl, .json or .parquet)")


def read_rows(path: str) -> list[dict | ValueError]:
    """All rows of a jsonl/json/parquet file as dicts (missing keys become None).

    JSON Lines are read line by line: a line that is not UTF-8, not JSON or not an
    object comes back as a ``ValueError`` saying why, in its row's place, so that it
    is named by row (or skipped and counted with ``skip_bad_rows``) like any bad row.
    """
    if not os.path.isfile(path):
        raise BadRowError(f"{path}: no such file")
    if _format(path) == "json":
        return _read_json_rows(path)
    import datasets

    try:
        table = datasets.load_dataset(_format(path), data_files=path, split="train")
        return table.to_list()
    except Exception as err:
        raise BadRowError(f"{path}: cannot be read as a table ({type(err).__name__}: {err})") from None


def _read_json_rows(path: str) -> list[dict | ValueError]:
    import json

    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip().startswith(b"["):  # one JSON array of objects
        try:
            rows = json.loads(data.decode("utf-8"))
        except ValueError as err:
            raise BadRowError(f"{path}: cannot be read as a JSON array ({type(err).__name__}: {err})") from None
        return [row if isinstance(row, dict) else ValueError(f"not a JSON object: {type(row).__name__}")
                for row in rows]
    rows: list[dict | ValueError] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            rows.append(ValueError(f"not UTF-8 text: byte {err.object[err.start]:#04x} at offset {err.start} of the line"))
            continue
        except ValueError as err:
            rows.append(ValueError(f"not valid JSON: {err}"))
            continue
        rows.append(row if isinstance(row, dict) else ValueError(f"not a JSON object: {type(row).__name__}"))
    return rows


def _text(value, what: str, allow_numbers: bool) -> str:
    """The field as a string; raises ValueError with the reason when it cannot be one."""
    if value is None:
        raise ValueError(f"missing {what}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"wrong type: {what} is {type(value).__name__}, expected string")
    if not isinstance(value, str):
        if not allow_numbers:
            raise ValueError(f"wrong type: {what} is {type(value).__name__}, expected string")
        value = str(value)
    return value


def row_to_problem(row: dict, columns: Columns, row_id: str) -> Problem:
    """One row -> one problem.

    Raises:
        ValueError: the reason this row is bad (``missing answer``, ``empty prompt``...).
    """
    question = _text(row.get(columns.question), "prompt", allow_numbers=False)
    context = ""
    if columns.context_marker and columns.context_marker in question:
        question, _, context = question.partition(columns.context_marker)
    elif columns.context:
        raw = row.get(columns.context)
        context = "" if raw is None else _text(raw, "context", allow_numbers=True)
    question, context = question.strip(), context.strip()
    if not question:
        raise ValueError("empty prompt")
    answer = _text(row.get(columns.answer), "answer", allow_numbers=True).strip()
    if not answer:
        raise ValueError("missing answer")
    if columns.id:
        row_id = _text(row.get(columns.id), "id", allow_numbers=True)
    return Problem(id=row_id, question=question, answer=answer, context=context)


def load_problem_file(
    path: str,
    columns: Columns,
    *,
    skip_bad_rows: bool = False,
    prompt_length: Callable[[Problem], int] | None = None,
    max_prompt_tokens: int | None = None,
) -> tuple[list[Problem], LoadReport]:
    """Reads one jsonl/parquet file into problems.

    Args:
        path: The file.
        columns: Column names and the optional context marker.
        skip_bad_rows: Skip and count bad rows instead of raising on the first.
        prompt_length: Token count of a problem's templated student prompt.
        max_prompt_tokens: Rows with a longer prompt are bad (needs ``prompt_length``).

    Returns:
        The problems and a report of rows read, kept and skipped per reason.

    Raises:
        BadRowError: unreadable file, missing question column, or (without
            ``skip_bad_rows``) the first bad row, as ``path: row i: reason``.
    """
    rows = read_rows(path)
    report = LoadReport(path=path, rows=len(rows))
    dicts = [row for row in rows if isinstance(row, dict)]
    if dicts and not any(columns.question in row for row in dicts):
        raise BadRowError(f"{path}: no column {columns.question!r} (columns: {sorted(dicts[0])})")
    problems = []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, ValueError):
                raise row
            problem = row_to_problem(row, columns, f"{os.path.basename(path)}:{i}")
            if prompt_length is not None and max_prompt_tokens is not None:
                n = prompt_length(problem)
                if n > max_prompt_tokens:
                    raise ValueError(f"prompt too long: {n} tokens > max_prompt_tokens={max_prompt_tokens}")
        except ValueError as err:
            if not skip_bad_rows:
                raise BadRowError(f"{path}: row {i}: {err}") from None
            report.skipped[str(err).split(":")[0]] += 1
            continue
        problems.append(problem)
    report.kept = len(problems)
    if report.skipped:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items()))
        log.warning("%s: skipped %d of %d rows (%s)", path, report.rows - report.kept, report.rows, reasons)
    return problems, report


def load_problem_files(paths: list[str], columns: Columns, **kwargs) -> list[Problem]:
    """Problems of several files in order (see ``load_problem_file`` for the keywords)."""
    problems: list[Problem] = []
    for path in paths:
        problems.extend(load_problem_file(path, columns, **kwargs)[0])
    return problems
