"""Loading problems from jsonl / parquet: columns, context marker, and every bad-row case."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sdpg.data.files import BadRowError, Columns, load_problem_file, load_problem_files

GOOD = {"question": "What is 2+3?", "answer": "5", "solution": "2+3=5"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
    return str(path)


def test_good_rows_jsonl_and_parquet(tmp_path):
    rows = [GOOD, {"question": "1+1", "answer": 2, "solution": None}]
    for path in (write_jsonl(tmp_path / "a.jsonl", rows), write_parquet(tmp_path / "a.parquet", [GOOD])):
        problems, report = load_problem_file(path, Columns())
        assert problems[0].question == "What is 2+3?" and problems[0].answer == "5"
        assert problems[0].context == "2+3=5" and problems[0].id.endswith(":0")
        assert report.kept == report.rows
    problems, _ = load_problem_file(str(tmp_path / "a.jsonl"), Columns())
    assert problems[1].answer == "2" and problems[1].context == ""


def test_custom_columns_id_and_marker_split(tmp_path):
    rows = [{"prompt": "Solve x+1=3.\n[TEACHER_CONTEXT_TOKEN]\nHint: subtract 1.", "gt": "2", "uid": "p7"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    cols = Columns(question="prompt", answer="gt", context="", id="uid", context_marker="[TEACHER_CONTEXT_TOKEN]")
    (p,), _ = load_problem_file(path, cols)
    assert (p.id, p.question, p.answer, p.context) == ("p7", "Solve x+1=3.", "2", "Hint: subtract 1.")


BAD_CASES = [
    ({"question": "q", "solution": "s"}, "missing answer"),
    ({"question": "q", "answer": "", "solution": "s"}, "missing answer"),
    ({"question": "   ", "answer": "1"}, "empty prompt"),
    ({"question": None, "answer": "1"}, "missing prompt"),
    ({"question": "q", "answer": [1, 2]}, "wrong type: answer is list"),
    ({"question": "q", "answer": True}, "wrong type: answer is bool"),
    ({"question": "q", "answer": "1", "solution": {"a": 1}}, "wrong type: context is dict"),
]


@pytest.mark.parametrize("row, message", BAD_CASES)
def test_each_bad_row_fails_naming_file_and_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(BadRowError) as err:
        load_problem_file(path, Columns())
    assert str(err.value).startswith(f"{path}: row 1: {message}")


def test_wrong_type_prompt_in_parquet(tmp_path):
    schema = pa.schema([("question", pa.int64()), ("answer", pa.string())])
    path = write_parquet(tmp_path / "t.parquet", [{"question": 5, "answer": "1"}], schema)
    with pytest.raises(BadRowError, match=r"t\.parquet: row 0: wrong type: prompt is int"):
        load_problem_file(path, Columns())


def test_prompt_too_long(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, {"question": "x" * 500, "answer": "1"}])
    with pytest.raises(BadRowError, match=r"long\.jsonl: row 1: prompt too long: 500 tokens > max_prompt_tokens=100"):
        load_problem_file(path, Columns(), prompt_length=lambda p: len(p.question), max_prompt_tokens=100)


def test_skip_bad_rows_counts_every_reason_and_logs(tmp_path, caplog):
    rows = [GOOD] + [row for row, _ in BAD_CASES] + [{"question": "y" * 300, "answer": "1"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        problems, report = load_problem_file(
            path, Columns(), skip_bad_rows=True, prompt_length=lambda p: len(p.question), max_prompt_tokens=100
        )
    assert len(problems) == 1 and report.rows == 9 and report.kept == 1
    assert report.skipped == {"missing answer": 2, "empty prompt": 1, "missing prompt": 1,
                              "wrong type": 3, "prompt too long": 1}
    assert "mixed.jsonl: skipped 8 of 9 rows" in caplog.text


def test_file_level_errors(tmp_path):
    with pytest.raises(BadRowError, match="no such file"):
        load_problem_file(str(tmp_path / "none.jsonl"), Columns())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(BadRowError, match="unknown file type"):
        load_problem_file(str(tmp_path / "x.csv"), Columns())
    path = write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "q", "answer": "1"}])
    with pytest.raises(BadRowError, match=r"cols\.jsonl: no column 'question'"):
        load_problem_file(path, Columns())
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "1"}\n{not json\n')
    with pytest.raises(BadRowError, match=r"broken\.jsonl: row 1: not valid JSON"):
        load_problem_file(str(tmp_path / "broken.jsonl"), Columns())


def test_several_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    b = write_parquet(tmp_path / "b.parquet", [{"question": "q2", "answer": "7", "solution": ""}])
    problems = load_problem_files([a, b], Columns())
    assert [p.answer for p in problems] == ["5", "7"]


def test_files_task_through_the_config(tmp_path):
    from megatron_sdpg.data import DataConfig, build_prompt_source, build_task

    train = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"question": "q" * 50, "answer": "1"}, {"question": "x"}])
    heldout = write_parquet(tmp_path / "eval.parquet", [GOOD])
    cfg = DataConfig(task="files", train_files=[train], eval_files=[heldout], skip_bad_rows=True, max_prompt_tokens=20)
    cfg.validate("data")
    task = build_task(cfg, prompt_length=lambda p: len(p.question))
    source = build_prompt_source(task, cfg, batch_size=3)
    assert [p.answer for p in source.next_batch()] == ["5", "5", "5"]
    assert [p.answer for p in task.problems("heldout")] == ["5"]
    cfg.skip_bad_rows = False
    with pytest.raises(BadRowError, match=r"train\.jsonl: row 1: prompt too long"):
        build_task(cfg, prompt_length=lambda p: len(p.question)).problems("train")
