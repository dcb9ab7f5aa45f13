"""Public math datasets in their published layouts -> the trainer's problem rows.

Every layout becomes rows ``{question, answer, solution, source, id}`` (``solution``
is "" when the dataset has none). Layouts (each as published on Hugging Face):

* ``dapo-math-17k`` (BytedTsinghua-SIA/DAPO-Math-17k, verl RL parquet): ``prompt`` is a
  chat list whose user message wraps the problem in DAPO's "Answer:" instruction,
  ``reward_model.ground_truth`` the answer, ``extra_info.index`` an id. The published
  file repeats every problem (1.79M rows, ~17.9k distinct); duplicates (same
  question) are removed, and, as in the SDPG paper's "13.9k English samples",
  problems whose text contains CJK characters are dropped (the paper does not say
  how it filtered; this is our rule, counted as ``non_english``).
* ``gsm8k`` (openai/gsm8k): ``question`` and ``answer``, the answer being the worked
  solution ending in ``#### <number>``; the number is the answer, the text before
  it the solution (with GSM8K's ``<<...>>`` calculator annotations removed).
* ``math`` (hendrycks MATH, EleutherAI/hendrycks_math; HuggingFaceH4/MATH-500):
  ``problem`` and ``solution``; the answer is the last ``\\boxed{}`` of the
  solution, or the ``answer`` column where there is one (MATH-500).
* ``aime`` (HuggingFaceH4/aime_2024, AI-MO/aimo-validation-aime, Maxwell-Jia/AIME_2024,
  opencompass/AIME2025, math-ai/aime25, yentinglin/aime_2025): a problem column
  (``problem``/``Problem``/``question``), an answer column (``answer``/``Answer``),
  optional ``solution``/``Solution`` and ``id``/``ID``.
* ``amc`` (AI-MO/aimo-validation-amc, math-ai/amc23, zwhe99/amc23): the same columns;
  answers published as floats (``27.0``) are written as integers when integral.

``year`` keeps only rows whose ``url``/``id``/``year`` mention that year (the AI-MO
sets mix 2022-2024). A row without a question or an answer is bad: counted and
skipped, or reported as ``file: row i: reason`` (see ``files.py``).
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from megatron_sdpg.data.files import BadRowError, _text, read_rows
from megatron_sdpg.rewards.extract import last_boxed

FORMATS = ("dapo-math-17k", "gsm8k", "math", "aime", "amc")

# DAPO-Math-17k's wrapper around every problem (its prompt[0].content).
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

_CJK = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")
_QUESTION_KEYS = ("problem", "Problem", "question", "Question")
_ANSWER_KEYS = ("answer", "Answer")
_SOLUTION_KEYS = ("solution", "Solution")
_ID_KEYS = ("id", "ID", "unique_id")


@dataclass
class PrepareReport:
    """What preparing the input files did (printed as the tool's JSON line).

    Attributes:
        rows: Rows read.
        kept: Rows written.
        duplicates: Rows dropped as repeats of an earlier question.
        non_english: Rows dropped by the English filter (dapo-math-17k).
        other_year: Rows dropped by ``year``.
        skipped: Bad rows skipped, per reason.
    """

    rows: int = 0
    kept: int = 0
    duplicates: int = 0
    non_english: int = 0
    other_year: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _answer_text(value) -> str:
    """An answer as text; integral floats (AMC's ``27.0``) as integers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _text(value, "answer", allow_numbers=True).strip()


def _user_message(prompt) -> str:
    """The (last) user message of a chat-format prompt column."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("missing prompt (expected a list of chat messages)")
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("missing prompt (no user message)")
    return _text(users[-1].get("content"), "prompt", allow_numbers=False)


def strip_dapo_wrapper(content: str) -> str:
    """The bare problem inside DAPO-Math-17k's instruction wrapper (unchanged if not wrapped)."""
    if content.startswith(DAPO_PREFIX):
        content = content[len(DAPO_PREFIX):]
    if content.endswith(DAPO_SUFFIX):
        content = content[: -len(DAPO_SUFFIX)]
    return content.strip()


def _dapo(row: dict) -> dict:
    question = strip_dapo_wrapper(_user_message(row.get("prompt")))
    reward = row.get("reward_model")
    if not isinstance(reward, dict):
        raise ValueError("missing answer (no reward_model field)")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    return {"question": question, "answer": _answer_text(reward.get("ground_truth")), "solution": "",
            "id": extra.get("index")}


def _gsm8k(row: dict) -> dict:
    full = _text(row.get("answer"), "answer", allow_numbers=False)
    if "####" not in full:
        raise ValueError("missing answer (no '####' in the answer column)")
    solution, _, answer = full.rpartition("####")
    return {"question": _text(row.get("question"), "prompt", allow_numbers=False),
            "answer": answer.strip().replace(",", ""), "solution": _GSM8K_CALC.sub("", solution).strip(),
            "id": None}


def _math(row: dict) -> dict:
    solution = _text(row.get("solution"), "solution", allow_numbers=False)
    answer = row.get("answer")
    if answer is None:
        answer = last_boxed(solution)
        if answer is None:
            raise ValueError("missing answer (no \\boxed{} in the solution)")
    return {"question": _text(row.get("problem"), "prompt", allow_numbers=False), "answer": _answer_text(answer),
            "solution": solution.strip(), "id": _first(row, _ID_KEYS)}


def _competition(row: dict) -> dict:
    solution = _first(row, _SOLUTION_KEYS)
    return {"question": _text(_first(row, _QUESTION_KEYS), "prompt", allow_numbers=False),
            "answer": _answer_text(_first(row, _ANSWER_KEYS)),
            "solution": "" if solution is None else _text(solution, "solution", allow_numbers=False).strip(),
            "id": _first(row, _ID_KEYS)}


_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "dapo-math-17k": _dapo, "gsm8k": _gsm8k, "math": _math, "aime": _competition, "amc": _competition,
}


def iter_rows(path: str) -> Iterator[dict]:
    """The rows of a file as dicts; parquet is streamed in record batches (DAPO's 1.79M rows).

    Raises:
        BadRowError: no such file, or not readable as a table (one line naming the file).
    """
    if not path.endswith(".parquet"):
        yield from read_rows(path)
        return
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise BadRowError(f"{path}: no such file")
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=8192)
        for batch in batches:
            yield from batch.to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise BadRowError(f"{path}: cannot be read as a table ({type(err).__name__}: {err})") from None


def _mentions_year(row: dict, year: str) -> bool:
    return any(year in str(row.get(k, "")) for k in ("url", "id", "ID", "year", "Year", "source"))


def convert_rows(fmt: str, paths: list[str], source: str = "", *, skip_bad_rows: bool = False,
                 year: str = "") -> tuple[list[dict], PrepareReport]:
    """Reads the input files of one layout and returns the problem rows.

    Args:
        fmt: One of ``FORMATS``.
        paths: Local copies of the published files (jsonl/json/parquet), read in order.
        source: The ``source`` field of every row (default: ``fmt``).
        skip_bad_rows: Skip and count bad rows instead of raising on the first.
        year: Keep only rows mentioning this year (see module docstring); "" keeps all.

    Returns:
        ``(rows, report)``; rows have ``question, answer, solution, source, id``.

    Raises:
        BadRowError: unreadable file or (without ``skip_bad_rows``) the first bad row,
            as ``path: row i: reason``.
    """
    if fmt not in _CONVERTERS:
        raise BadRowError(f"unknown format {fmt!r}; choose from {list(FORMATS)}")
    convert, source = _CONVERTERS[fmt], source or fmt
    report, out, seen, ids = PrepareReport(), [], set(), set()
    for path in paths:
        for i, row in enumerate(iter_rows(path)):
            report.rows += 1
            if year and not _mentions_year(row, year):
                report.other_year += 1
                continue
            try:
                item = convert(row)
                item["question"] = item["question"].strip()
                if not item["question"]:
                    raise ValueError("empty prompt")
                if not item["answer"]:
                    raise ValueError("missing answer")
            except ValueError as err:
                if not skip_bad_rows:
                    raise BadRowError(f"{path}: row {i}: {err}") from None
                report.skipped[str(err).split(" (")[0].split(":")[0]] += 1
                continue
            if item["question"] in seen:
                report.duplicates += 1
                continue
            seen.add(item["question"])
            if fmt == "dapo-math-17k" and _CJK.search(item["question"]):
                report.non_english += 1
                continue
            row_id = str(item["id"]) if item["id"] is not None else f"{source}-{len(out)}"
            item["id"] = row_id if row_id not in ids else f"{row_id}-{len(out)}"
            ids.add(item["id"])
            item["source"] = source
            out.append({k: item[k] for k in ("question", "answer", "solution", "source", "id")})
    report.kept = len(out)
    return out, report
