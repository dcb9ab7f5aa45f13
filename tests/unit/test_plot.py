"""`python -m megatron_sdpg.plot RUN_DIR`: valid PNGs from a synthetic run, gaps and absent
metrics handled, one-line errors for missing inputs."""

import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from megatron_sdpg import plot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_run(run_dir, steps=30):
    """Every metric but beta; ref_kl null on steps 5-6 (as MetricsLog writes NaN); eval every 10
    steps; a resumed step 3 written twice (the later record wins)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for s in list(range(steps)) + [3]:
            rec = {"step": s, "reward": 0.2 + s / 50, "distill_kl": math.exp(-s / 10), "entropy": 1.0 - s / 100,
                   "ref_kl": None if s in (5, 6) else s * 1e-3, "response_length": 100 + s, "grad_norm": 1.0}
            if s % 10 == 0:
                rec["eval/accuracy"] = 0.1 + s / 100
                rec["eval/accuracy_with_context"] = 0.5 + s / 100
            f.write(json.dumps(rec) + "\n")
        f.write("\n")


def test_cli_writes_valid_pngs_and_names_absent_metrics(tmp_path):
    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "megatron_sdpg.plot", run_dir], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    paths = proc.stdout.split()
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["reward.png", "eval_accuracy.png", "eval_accuracy_with_context.png", "distill_kl.png",
                            "ref_kl.png", "entropy.png", "response_length.png", "overview.png"])
    for path in paths:
        assert os.path.dirname(path) == os.path.join(run_dir, "plots")
        assert os.path.getsize(path) > 0
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 350
            assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 10  # something was drawn
    assert "absent (not plotted): beta" in proc.stderr
    assert not [n for n in os.listdir(os.path.join(run_dir, "plots")) if n.endswith(".tmp")]


def test_missing_run_dir_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "nope")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "megatron_sdpg.plot", missing], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"error: run directory not found: {missing}"
    assert proc.stdout == ""


def test_missing_empty_or_bad_metrics_file_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert plot.main([str(run_dir)]) == 1
    assert capsys.readouterr().err.strip() == f"error: no metrics.jsonl in {run_dir}"
    (run_dir / "metrics.jsonl").write_text("")
    assert plot.main([str(run_dir)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {run_dir}/metrics.jsonl has no records"
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "reward": 1}\n{"step": 1, "reward": \n')
    assert plot.main([str(run_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run_dir}/metrics.jsonl: row 2 is not JSON") and "\n" not in err
    (run_dir / "metrics.jsonl").write_text('{"reward": 1}\n')
    assert plot.main([str(run_dir)]) == 1
    assert capsys.readouterr().err.strip() == f'error: {run_dir}/metrics.jsonl: row 1 has no integer "step"'


def test_series_keep_gaps_and_sparse_steps():
    records = [{"step": 0, "a": 1.0, "b": None}, {"step": 1, "a": None}, {"step": 2, "a": 3, "e": 0.5},
               {"step": 3, "a": float("nan"), "e": True}]
    a = plot.extract_series(records, "a")
    assert a.steps.tolist() == [0, 1, 2, 3]
    assert a.values[0] == 1.0 and a.values[2] == 3.0 and np.isnan(a.values[[1, 3]]).all()
    e = plot.extract_series(records, "e")  # logged on some steps only; a bool is not a number
    assert e.steps.tolist() == [2, 3] and e.values[0] == 0.5 and np.isnan(e.values[1])
    assert plot.extract_series(records, "b") is None  # only nulls: absent
    assert plot.extract_series(records, "missing") is None


def test_trailing_mean_skips_gaps():
    values = np.array([1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan])
    got = plot._trailing_mean(values, 2)
    expected = [1.0, 1.0, 3.0, 4.0, 5.0, np.nan, np.nan]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
