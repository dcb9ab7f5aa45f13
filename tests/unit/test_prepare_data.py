"""tools/prepare_data.py: every published layout -> problem rows the trainer loads.

Fixtures in tests/fixtures/datasets/ are written in the datasets' published layouts by
make_fixtures.py there (nothing is downloaded).
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_sdpg.data.files import BadRowError, Columns, load_problem_file
from megatron_sdpg.data.layouts import convert_rows, strip_dapo_wrapper
from megatron_sdpg.data.write import write_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures", "datasets")
TOOL = os.path.join(ROOT, "tools", "prepare_data.py")


def fx(name):
    return os.path.join(FIX, name)


def test_dapo_dedup_english_filter_and_bad_row():
    with pytest.raises(BadRowError, match=r"dapo-math-17k.parquet: row 4: missing answer"):
        convert_rows("dapo-math-17k", [fx("dapo-math-17k.parquet")])
    rows, rep = convert_rows("dapo-math-17k", [fx("dapo-math-17k.parquet")], skip_bad_rows=True)
    assert [r["question"] for r in rows] == ["Let $x$ satisfy $2x + 3 = 11$. Find $x^2$.",
                                             "How many positive divisors does $36$ have?"]
    assert [(r["answer"], r["id"], r["source"], r["solution"]) for r in rows] == [
        ("16", "a1", "dapo-math-17k", ""), ("9", "a2", "dapo-math-17k", "")]
    assert (rep.rows, rep.kept, rep.duplicates, rep.non_english) == (6, 2, 2, 1)
    assert dict(rep.skipped) == {"missing answer": 1}


def test_strip_dapo_wrapper_leaves_other_prompts():
    assert strip_dapo_wrapper("  plain question ") == "plain question"


def test_gsm8k_hashes_answer_and_solution():
    with pytest.raises(BadRowError, match=r"gsm8k-train.parquet: row 2: missing answer"):
        convert_rows("gsm8k", [fx("gsm8k-train.parquet")])
    rows, rep = convert_rows("gsm8k", [fx("gsm8k-train.parquet")], skip_bad_rows=True)
    assert [r["answer"] for r in rows] == ["10", "2400"]
    assert rows[0]["solution"] == "Tom has 3*4=12 apples.\nAfter eating 2 he has 12-2=10."
    assert rep.skipped["missing answer"] == 1


def test_math_boxed_and_math500_answer_column():
    rows, rep = convert_rows("math", [fx("hendrycks-math-test.parquet")], skip_bad_rows=True)
    assert [r["answer"] for r in rows] == ["\\frac{5}{6}", "3"] and rep.skipped["missing answer"] == 1
    assert rows[0]["solution"].endswith("\\boxed{\\frac{5}{6}}$.")
    rows, _ = convert_rows("math", [fx("math-500-test.jsonl")])
    assert [(r["answer"], r["id"]) for r in rows] == [("7", "test/prealgebra/1.json"),
                                                      ("\\frac{1}{2}", "test/prealgebra/2.json")]


def test_aime_2024_and_2025_layouts():
    rows, _ = convert_rows("aime", [fx("aime_2024-train.parquet")], source="aime24")
    assert [(r["id"], r["answer"], r["source"]) for r in rows] == [("60", "9", "aime24"), ("61", "024", "aime24")]
    assert rows[1]["solution"] == "$2^{10}=1024$, remainder $\\boxed{24}$."
    rows, _ = convert_rows("aime", [fx("aime2025-I.jsonl"), fx("aime2025-II.jsonl")], source="aime25")
    assert [(r["question"], r["answer"], r["id"]) for r in rows] == [
        ("Find $1+2+\\cdots+10$.", "55", "aime25-0"), ("Find $3^4$.", "81", "aime25-1")]


def test_amc_float_answers_and_year_filter():
    rows, rep = convert_rows("amc", [fx("aimo-validation-amc.parquet")], source="amc23", year="2023")
    assert [(r["answer"], r["id"]) for r in rows] == [("27", "0"), ("1.5", "1")]
    assert rep.other_year == 1


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_cli_output_loads_as_problem_file(tmp_path, ext):
    out = tmp_path / f"train.{ext}"
    proc = subprocess.run([sys.executable, TOOL, "--format", "math", "--input", fx("math-500-test.jsonl"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["kept"], summary["with_solution"]) == (2, 2)
    problems, report = load_problem_file(str(out), Columns(id="id"))
    assert [(p.id, p.answer) for p in problems] == [("test/prealgebra/1.json", "7"),
                                                    ("test/prealgebra/2.json", "\\frac{1}{2}")]
    assert problems[0].context.startswith("$7^2=49$")


def test_cli_bad_row_one_line_rc2(tmp_path):
    out = tmp_path / "x.jsonl"
    proc = subprocess.run([sys.executable, TOOL, "--format", "gsm8k", "--input", fx("gsm8k-train.parquet"),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("gsm8k-train.parquet: row 2: missing answer (no '####' in the answer column)")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_write_rows_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.jsonl"
    write_rows(str(path), [{"question": "q", "answer": "1"}])
    with pytest.raises(TypeError):
        write_rows(str(path), [{"question": object()}])
    assert path.read_text() == '{"question": "q", "answer": "1"}\n'
    assert os.listdir(tmp_path) == ["a.jsonl"]


def test_unreadable_or_missing_input_is_one_line(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file")
    with pytest.raises(BadRowError, match=r"junk.parquet: cannot be read as a table"):
        convert_rows("aime", [str(junk)])
    with pytest.raises(BadRowError, match=r"nope.parquet: no such file"):
        convert_rows("aime", [str(tmp_path / "nope.parquet")])
    with pytest.raises(BadRowError, match=r"unknown format"):
        convert_rows("olympiad", [str(junk)])
