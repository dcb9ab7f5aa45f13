"""Fixtures shared across test layers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_task_model(tmp_path_factory):
    """The synthetic-task tiny model at test size, built once per session by the real CLI.

    Returns:
        ``(hf_dir, summary)``: the HF directory and the builder's final JSON line.
        Tests must not write into ``hf_dir``.
    """
    out = tmp_path_factory.mktemp("tiny") / "model"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--out", str(out), "--size", "test",
           "--steps", "4", "--eval-every", "2", "--eval-n", "8", "--report-n", "8", "--template", "compact"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out), json.loads(proc.stdout.strip().splitlines()[-1])
