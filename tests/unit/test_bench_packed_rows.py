"""Smoke test: the packed-rows benchmark runs on a tiny model and reports its fields (no timing asserts)."""

import contextlib
import io
import json

import pytest

from benchmarks.bench_packed_rows import main
from megatron_sdpg.testing.tiny_hf import build_tiny_llama


def test_one_json_line_per_preset_with_fewer_positions_packed(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--model-dir", build_tiny_llama(str(tmp_path / "tiny")), "--reps", "1", "--presets", "grpo", "sdpg"])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["preset"] for line in lines] == ["grpo", "sdpg"]
    for line in lines:
        assert line["padded_s"] > 0 and line["packed_s"] > 0 and line["speedup"] > 0
        assert line["tokens"] <= line["packed_tokens"] < line["padded_tokens"]
        assert line["loss_max_abs_diff"] < 1e-4  # the same batch, the same loss


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--model-dir", str(tmp_path / "missing")])
    assert err.value.code == 2
    assert "--model-dir: no model in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["--reps", "0"])
    assert err.value.code == 2
