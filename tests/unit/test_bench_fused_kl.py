"""Smoke test: the fused-output benchmark's --quick mode runs and reports sane numbers (no timing asserts)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_mode_prints_one_json_line_per_tp_with_ratios_and_float64_errors():
    # Run as a user runs it: `python benchmarks/bench_fused_kl.py` from the repository root, no PYTHONPATH
    # (it imports benchmarks.bench_vocab_parallel_kl, which failed with ModuleNotFoundError that way).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "benchmarks/bench_fused_kl.py", "--quick", "--tp", "1", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["tp"] for line in lines] == [1, 2]
    for line in lines:
        assert line["tokens"] == 64 and line["vocab"] == 4096
        for path in ("logits", "fused", "fused_recompute"):
            r = line[path]
            assert r["peak_extra_bytes"] > 0 and r["time_s"] > 0, (path, r)
            assert r["max_rel_err"] < 1e-5, (path, r)
            assert set(r) >= {"rel_err_lp", "rel_err_kl", "rel_err_ent", "rel_err_grad_h", "rel_err_grad_w"}
        assert line["mem_ratio"] > 0 and line["time_ratio"] > 0 and line["max_rel_err"] < 1e-5
        assert line["time_ratio_recompute"] > 0 and line["max_rel_err_recompute"] < 1e-5
