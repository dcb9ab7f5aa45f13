"""python -m megatron_sdpg.eval --files: mean@k and unbiased pass@k per benchmark file.

pass@k is checked against a brute-force float64 reference (the fraction of k-subsets
of the samples holding a correct one); the CLI is run through a real CPU server on
loopback and in-process, and its numbers are recomputed from the samples it wrote.
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_sdpg.data.tasks import get_task
from megatron_sdpg.eval_files import ks_up_to, pass_at_k
from megatron_sdpg.testing.rollout import start_cpu_server
from tests.e2e.solution_verifiers import third

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def brute_pass_at_k(flags: list[list[bool]], k: int) -> float:
    per_problem = []
    for f in flags:
        subsets = list(itertools.combinations(range(len(f)), k))
        per_problem.append(np.mean([any(f[i] for i in s) for s in subsets], dtype=np.float64))
    return float(np.mean(per_problem, dtype=np.float64))


def test_unbiased_pass_at_k_matches_subset_enumeration():
    rng = np.random.default_rng(0)
    flags = [list(rng.random(8) < p) for p in (0.0, 0.1, 0.5, 0.9, 1.0, 0.3)]
    counts = [int(sum(f)) for f in flags]
    for k in range(1, 9):
        assert abs(pass_at_k(counts, 8, k) - brute_pass_at_k(flags, k)) < 1e-12
    assert pass_at_k(counts, 8, 1) == pytest.approx(sum(counts) / 48, abs=1e-15)
    assert ks_up_to(32) == [1, 2, 4, 8, 16, 32] and ks_up_to(6) == [1, 2, 4, 6] and ks_up_to(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(counts, 8, 9)


def _bench(path, n, offset):
    task = get_task("synthetic", terms=3, digits=2, min_digits=2, response="scratchpad", context="carries")
    with open(path, "w") as f:
        for i, p in enumerate(task.problems("heldout", offset + n)[offset:]):
            f.write(json.dumps({"question": p.question, "answer": p.answer, "id": f"{path.stem}-{i}"}) + "\n")


def _check(stdout, responses, names, samples):
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["samples"] == samples and set(result["benchmarks"]) == set(names)
    rows = [json.loads(line) for line in open(responses)]
    for name in names:
        mine = [r for r in rows if r["benchmark"] == name]
        ids = sorted({r["id"] for r in mine})
        assert all(r["correct"] == third(r["response"], r["answer"]) for r in mine)
        flags = [[r["correct"] for r in sorted(mine, key=lambda r: r["sample"]) if r["id"] == i] for i in ids]
        assert all(len(f) == samples for f in flags)
        got = result["benchmarks"][name]
        assert got["n"] == len(ids)
        assert got[f"mean@{samples}"] == pytest.approx(np.mean(flags, dtype=np.float64), abs=1e-12)
        for k in ks_up_to(samples):
            assert got[f"pass@{k}"] == pytest.approx(brute_pass_at_k(flags, k), abs=1e-12)
    return result


def test_cli_files_through_cpu_server_and_in_process(tiny_task_model, tmp_path):
    hf_dir, _ = tiny_task_model
    a, b = tmp_path / "bench_a.jsonl", tmp_path / "bench_b.jsonl"
    _bench(a, 4, 0)
    _bench(b, 3, 10)
    env = {**os.environ, "PYTHONPATH": ROOT}
    base = [sys.executable, "-m", "megatron_sdpg.eval", "--hf-dir", hf_dir, "--files", str(a), str(b),
            "--samples", "4", "--max-new-tokens", "8", "--template", "compact",
            "--verifier", "tests.e2e.solution_verifiers:third"]
    engine = start_cpu_server(hf_dir, str(tmp_path / "logs"))
    try:
        out = tmp_path / "engine.jsonl"
        proc = subprocess.run(base + ["--base-url", engine.url, "--responses-out", str(out)],
                              capture_output=True, text=True, timeout=300, env=env)
    finally:
        engine.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _check(proc.stdout, out, ["bench_a", "bench_b"], 4)
    assert result["engine"] == engine.url and result["temperature"] == 1.0 and result["top_p"] == 1.0

    out = tmp_path / "local.jsonl"
    proc = subprocess.run(base + ["--responses-out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _check(proc.stdout, out, ["bench_a", "bench_b"], 4)["engine"] == "in-process"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1"}) + "\n")
    proc = subprocess.run(base[:6] + [str(bad)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"eval: {bad}: row 0: missing answer"
