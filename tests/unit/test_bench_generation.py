"""Smoke test: the generation benchmark's --quick mode runs on a tiny model and reports its fields (no timing asserts)."""

import contextlib
import io
import json

from benchmarks.bench_generation import main
from megatron_sdpg.testing.tiny_hf import build_tiny_llama


def test_quick_mode_prints_one_json_line_per_case(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--model-dir", build_tiny_llama(str(tmp_path / "tiny")), "--quick", "--threads", "1"])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["case"], line["threads"]) for line in lines] == [("eos", 1), ("ignore_eos", 1)]
    for line in lines:
        assert line["rows"] == 8 and line["max_new_tokens"] == 8
        assert line["project_tokens_per_s"] > 0 and line["hf_tokens_per_s"] > 0 and line["ratio"] > 0
        assert line["project_cpu_s"] > 0 and line["hf_cpu_s"] > 0
