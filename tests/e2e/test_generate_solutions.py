"""tools/generate_solutions.py against a real CPU rollout server on loopback (tiny model).

The server's ``/v1/chat/completions`` is checked directly (chat template, n, seed,
refusals); the tool is run as a subprocess, SIGKILLed mid-run and rerun to show that
the resumed run redoes no finished problem and loses none.
"""

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import aiohttp
import asyncio
import pytest
from transformers import AutoTokenizer

from megatron_sdpg.data.tasks import get_task
from megatron_sdpg.testing.rollout import start_cpu_server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "generate_solutions.py")
N_PROBLEMS = 24


@pytest.fixture(scope="module")
def server(tiny_task_model, tmp_path_factory):
    hf_dir, _ = tiny_task_model
    engine = start_cpu_server(hf_dir, str(tmp_path_factory.mktemp("gen_logs")))
    try:
        yield engine.url, hf_dir
    finally:
        engine.stop()


def _post(url, body):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                return r.status, await r.json()

    return asyncio.run(go())


def test_chat_completions_uses_the_chat_template(server):
    url, hf_dir = server
    tok = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "12+34+56"}]
    body = {"model": "tiny", "messages": messages, "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 5}
    status, out = _post(url, body)
    assert status == 200, out
    expected = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and out["model"] == "tiny"
    assert all(c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length") for c in out["choices"])
    again = _post(url, body)[1]
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in out["choices"]]
    greedy = _post(url, {**body, "temperature": 0, "n": 2})[1]["choices"]
    assert greedy[0]["message"]["content"] == greedy[1]["message"]["content"]
    status, err = _post(url, {**body, "stream": True})
    assert status == 400 and err["error"]["message"].startswith("stream:")
    status, err = _post(url, {"model": "tiny", "messages": "hi"})
    assert status == 400 and err["error"]["message"].startswith("messages:")


def _problem_file(path):
    task = get_task("synthetic", terms=3, digits=2, min_digits=2, response="scratchpad", context="carries")
    with open(path, "w") as f:
        for i, p in enumerate(task.problems("heldout", N_PROBLEMS)):
            row = {"question": p.question, "answer": p.answer, "source": "synthetic", "id": f"s{i}"}
            f.write(json.dumps(row) + "\n")


def _cmd(url, inp, out, verifier):
    return [sys.executable, TOOL, "--input", str(inp), "--out", str(out), "--base-url", url + "/v1",
            "--model", "tiny", "--concurrency", "1", "--samples-per-problem", "2", "--max-tries", "3",
            "--max-tokens", "16", "--template", "compact", "--seed", "0", "--verifier", verifier,
            "--no-progress-bar"]


def _progress_ids(path):
    with open(path, "rb") as f:
        return [json.loads(line)["id"] for line in f.read().split(b"\n")[:-1] if line.strip()]


def test_kill_and_resume_keeps_only_verified_solutions(server, tmp_path):
    url, _ = server
    inp, out = tmp_path / "problems.jsonl", tmp_path / "solved.jsonl"
    progress = str(out) + ".progress.jsonl"
    _problem_file(inp)
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = _cmd(url, inp, out, "tests.e2e.solution_verifiers:third")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (os.path.exists(progress) and len(_progress_ids(progress)) >= 3):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no progress within 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the output appeared before the run finished"
    first = {}
    with open(progress) as f:
        for line in f:
            record = json.loads(line)
            first[record["id"]] = record
    assert 3 <= len(first) < N_PROBLEMS

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == len(first) and summary["attempted_now"] == N_PROBLEMS - len(first)
    assert summary["requests"] <= (N_PROBLEMS - len(first)) * 3
    assert summary["complete"] and len(_progress_ids(progress)) == N_PROBLEMS
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(N_PROBLEMS)]
    assert all(r["source"] == "synthetic" for r in rows)
    for r in rows:  # kept only what the verifier accepted, and kept what the first run found
        assert r["solution"] == "" or zlib.crc32(r["solution"].encode()) % 3 == 0
        if r["id"] in first:
            assert r["solution"] == (first[r["id"]]["solution"] or "")
    assert summary["covered"] == sum(bool(r["solution"]) for r in rows) > 0
    assert summary["coverage"] == summary["covered"] / N_PROBLEMS

    # Nothing left to do: a third run sends no request and changes nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["requests"] == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_unreachable_endpoint_leaves_problems_for_a_rerun(tmp_path):
    inp, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    inp.write_text(json.dumps({"question": "1+1", "answer": "2", "id": "a"}) + "\n")
    cmd = _cmd("http://127.0.0.1:9", inp, out, "numeric") + ["--retries", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["unfinished"], summary["covered"], summary["complete"]) == (1, 0, False)
    assert os.path.exists(str(out) + ".progress.jsonl")


def test_torn_progress_line_is_redone_not_fatal(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_solutions", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "p.progress.jsonl"
    path.write_bytes(b'{"id": "a", "solution": "x", "tries": 1}\n{"id": "b", "solu')  # killed mid-write
    assert list(mod.read_progress(str(path))) == ["a"]
    log = mod.ProgressLog(str(path))
    log.append({"id": "c", "solution": None, "tries": 2})
    log.close()
    assert mod.read_progress(str(path)) == {"a": {"id": "a", "solution": "x", "tries": 1},
                                            "c": {"id": "c", "solution": None, "tries": 2}}


def test_second_concurrent_run_is_refused(tmp_path):
    import fcntl

    inp, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    inp.write_text(json.dumps({"question": "1+1", "answer": "2", "id": "a"}) + "\n")
    progress = str(out) + ".progress.jsonl"
    with open(progress, "a") as held:  # stands for a run in progress
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        proc = subprocess.run(_cmd("http://127.0.0.1:9", inp, out, "numeric"), capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"generate_solutions: {progress}: another generate_solutions run is writing it"
    assert not out.exists()
