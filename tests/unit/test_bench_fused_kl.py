"""Smoke test: the fused-output benchmark's --quick mode runs and reports sane numbers (no timing asserts)."""

import contextlib
import io
import json

from benchmarks.bench_fused_kl import main


def test_quick_mode_prints_one_json_line_per_tp_with_ratios_and_float64_errors():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--quick", "--tp", "1", "2"])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
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
