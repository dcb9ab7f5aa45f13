"""The ``files`` task: problems from jsonl / parquet files named in the config."""

from __future__ import annotations

from collections.abc import Callable

from megatron_sdpg.data.files import BadRowError, Columns, load_problem_files
from megatron_sdpg.data.problem import Problem


class FilesTask:
    """Training rows from ``train_files``, held-out rows from ``eval_files``.

    Args:
        train_files: Files of the training split.
        eval_files: Files of the held-out split.
        columns: Column names and the optional context marker.
        skip_bad_rows: Skip and count bad rows instead of failing.
        prompt_length: Token count of a problem's student prompt (for the length check).
        max_prompt_tokens: Longer prompts are bad rows.
        verifier: Default verifier of these problems.
    """

    name = "files"
    generated = False

    def __init__(
        self,
        train_files: list[str],
        eval_files: list[str],
        columns: Columns,
        *,
        skip_bad_rows: bool = False,
        prompt_length: Callable[[Problem], int] | None = None,
        max_prompt_tokens: int | None = None,
        verifier: str = "math",
    ):
        self.files = {"train": list(train_files), "heldout": list(eval_files)}
        self.default_verifier = verifier
        self._load_kwargs = dict(
            skip_bad_rows=skip_bad_rows, prompt_length=prompt_length, max_prompt_tokens=max_prompt_tokens
        )
        self._columns = columns
        self._cache: dict[str, list[Problem]] = {}

    def describe(self) -> dict:
        """The task's name and files."""
        return {"task": self.name, "files": self.files}

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """The first ``n`` (default: all) problems of ``split`` in file order; ``seed`` unused."""
        if split not in self.files:
            raise ValueError(f"files task has splits {sorted(self.files)}, not {split!r}")
        if not self.files[split]:
            raise ValueError(f"files task: no files for split {split!r} (set data.eval_files)")
        if split not in self._cache:
            self._cache[split] = load_problem_files(self.files[split], self._columns, **self._load_kwargs)
        found = self._cache[split]
        if not found:
            raise BadRowError(f"{', '.join(self.files[split])}: no usable rows for split {split!r} "
                              "(empty, or every row was skipped as bad)")
        if n is not None and n > len(found):
            raise ValueError(f"files task: split {split!r} has {len(found)} problems, {n} requested")
        return found if n is None else found[:n]
