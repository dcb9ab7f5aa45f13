"""Smoke test: the KL benchmark's --quick mode runs and reports sane numbers (no timing asserts)."""

import contextlib
import io
import json

from benchmarks.bench_vocab_parallel_kl import main


def test_quick_mode_prints_one_json_line_per_case():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--quick", "--tp", "1"])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["compare_tokens"] == 64 and line["tp"] == 1
    for impl in ("project", "project_inplace", "naive"):
        r = line[impl]
        assert r["peak_extra_bytes"] > 0 and r["time_s"] > 0
        assert r["max_rel_err_kl"] < 1e-5 and r["max_rel_err_grad"] < 1e-5, (impl, r)
    assert line["mem_ratio"] > 0 and line["time_ratio"] > 0
