"""Data-file faults: every bad row is named by file and row, or skipped and counted.

Non-UTF-8 bytes used to surface as a bare ``UnicodeDecodeError`` naming neither file
nor row (from the table reader), which ``skip_bad_rows`` did not cover. Through the
trainer CLI a bad row is one line and exit status 2.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_sdpg.data.files import BadRowError, Columns, load_problem_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = {"question": "1+2", "answer": "3"}


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def _good() -> bytes:
    return json.dumps(GOOD).encode()


BAD_LINES = [
    (b'{"question": "bad \xff\xfe", "answer": "3"}', "not UTF-8 text"),
    (b'{"question": "q", "answer": ', "not valid JSON"),
    (b'[1, 2]', "not a JSON object"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_is_named_by_file_and_row(tmp_path, line, reason):
    path = _write(tmp_path / "d.jsonl", [_good(), line, _good()])
    with pytest.raises(BadRowError) as err:
        load_problem_file(path, Columns())
    assert str(err.value).startswith(f"{path}: row 1: {reason}"), str(err.value)


def test_skip_bad_rows_covers_undecodable_rows(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_good()] + [line for line, _ in BAD_LINES] + [_good()])
    problems, report = load_problem_file(path, Columns(), skip_bad_rows=True)
    assert [p.answer for p in problems] == ["3", "3"] and [p.id for p in problems] == ["d.jsonl:0", "d.jsonl:4"]
    assert report.rows == 5 and report.kept == 2
    assert report.skipped == {"not UTF-8 text": 1, "not valid JSON": 1, "not a JSON object": 1}


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {"question": "2+2", "answer": 4}]))
    problems, _ = load_problem_file(str(path), Columns())
    assert [p.answer for p in problems] == ["3", "4"]


def test_trainer_names_the_bad_row_in_one_line(tiny_task_model, tmp_path):
    data = _write(tmp_path / "train.jsonl", [_good(), BAD_LINES[0][0]])
    cmd = [sys.executable, "-m", "megatron_sdpg.train", "--config",
           os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"), f"model.hf_dir={tiny_task_model[0]}",
           f"train.run_dir={tmp_path / 'run'}", "parallel.tp=1", "data.task=files", f"data.train_files=[{data}]",
           f"data.eval_files=[{data}]", "logging.progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"data error: {data}: row 1: not UTF-8 text: byte 0xff at offset 18 of the line"], proc.stderr


def test_a_split_with_no_usable_rows_is_named(tmp_path):
    from megatron_sdpg.data.tasks.files import FilesTask

    path = _write(tmp_path / "all_bad.jsonl", [BAD_LINES[0][0]])
    task = FilesTask([path], [path], Columns(), skip_bad_rows=True)
    with pytest.raises(BadRowError, match=r"all_bad\.jsonl: no usable rows for split 'train'"):
        task.problems("train")
