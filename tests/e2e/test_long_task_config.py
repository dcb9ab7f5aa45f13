"""``examples/configs/tiny_cpu_long.yaml`` through its first steps (the synthetic-long task's config).

The user path in miniature: ``tools/make_tiny_model.py --task synthetic-long`` builds a test-size
model (2 warm-start steps), then ``torchrun -m megatron_sdpg.train --config tiny_cpu_long.yaml``
runs 2 SDPG steps in the config's own layout, with its task, template, context and 80-token
responses; the CPU rollout server generates, the ``worked_sum`` verifier scores, the teacher sees
the worked-solution context.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.train.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu_long.yaml")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A test-size synthetic-long model (2 warm-start steps)."""
    model = tmp_path_factory.mktemp("long") / "model"
    build = [sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--out", str(model), "--size", "test",
             "--task", "synthetic-long", "--steps", "2", "--eval-every", "2", "--eval-n", "4", "--report-n", "4",
             "--batch-size", "8"]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=400, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model


@pytest.mark.timeout(900)
def test_tiny_cpu_long_yaml_trains_its_first_steps(long_model, tmp_path):
    model = long_model
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megatron_sdpg.train", "--config", CONFIG, f"model.hf_dir={model}", f"train.run_dir={run}",
           "train.steps=2", "train.eval_n=4", "train.eval_every=0", "train.prompts_per_step=2", "rollout.n_samples=4",
           f"rollout.base_port={free_port()}", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["preset"] == "sdpg"
    steps = [r for r in read_metrics(str(run)) if not r.get("final")]
    assert [r["step"] for r in steps] == [0, 1]
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["distill_kl"]) and r["distill_kl"] >= 0
        assert 0 < r["response_length"] <= r["response_length_max"] <= 80
        assert 0.0 <= r["reward/accuracy"] <= 1.0 and r["reward/verifier_errors"] == 0


@pytest.mark.timeout(900)
def test_reproduce_paper_mini_on_the_long_task_in_miniature(long_model, tmp_path):
    """``reproduce_paper_mini.py --task synthetic-long --full`` (docs/results.md's command for the long-task
    table) with one method, 2 steps: mean@k at the config's rollout temperature, the tables it writes."""
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "reproduce_paper_mini.py"), "--task", "synthetic-long",
           "--full", "--methods", "sdpg-initial", "--seeds", "1", "--steps", "2", "--eval-every", "1", "--eval-n", "4",
           "--meank", "2", "--prompts", "2", "--samples", "2", "--model-dir", str(long_model), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT},
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = out / "runs" / "sdpg-initial_seed1"
    assert "teacher_source: initial" in (run / "config.yaml").read_text()
    assert "temperature: 0.7" in (run / "config.yaml").read_text()
    meank = json.loads((run / "meank.json").read_text())
    assert meank["temperature"] == 0.7 and meank["task"] == "synthetic-long" and meank["n"] == 4
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["meank_temperature"] == 0.7 and result["settings"]["steps"] == 2
    md = (out / "results.md").read_text()
    for part in ("mean@2 T=0.7", "with the privileged context during training", "| SDPG, frozen initial teacher |",
                 "| method | reward (%) | entropy | response length |"):
        assert part in md, part
