"""``benchmarks/reproduce_paper_mini.py --decomposition`` end to end in miniature (the command docs/results.md
gives for the decomposition table): one method, one seed, 2 steps on the test-size model, through torchrun,
the CPU server, the held-out evaluations and mean@k; then a second call reuses the finished run."""

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rpm(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "reproduce_paper_mini.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.timeout(900)
def test_decomposition_trains_evaluates_and_reuses_a_run(tiny_task_model, tmp_path):
    model, out = tiny_task_model[0], tmp_path / "out"
    args = ["--decomposition", "--methods", "sdpg-nopg", "--seeds", "1", "--steps", "2", "--eval-every", "1",
            "--eval-n", "4", "--meank", "2", "--prompts", "2", "--samples", "2", "--model-dir", model, "--out", str(out)]
    proc = _rpm(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = out / "runs" / "sdpg-nopg_seed1"
    assert "policy_gradient_term: false" in (run / "config.yaml").read_text()  # the method's one change reached it
    steps = [json.loads(line) for line in open(run / "metrics.jsonl") if line.strip()]
    assert [r["step"] for r in steps if not r.get("final")] == [0, 1] and all(math.isfinite(r["loss"])
                                                                             for r in steps if "loss" in r)
    result = json.loads((out / "results.json").read_text())
    with open(os.path.join(model, "model.safetensors"), "rb") as f:
        assert result["settings"]["model_sha256"] == hashlib.sha256(f.read()).hexdigest()
    (seed1,) = result["runs"]["sdpg-nopg"]
    assert set(seed1) == {"last", "best", "with_context", "before", "mean@2", "reward", "entropy", "response_length"}
    assert all(0.0 <= seed1[k] <= 1.0 for k in ("last", "best", "with_context", "before", "mean@2", "reward"))
    assert seed1["entropy"] > 0 and seed1["response_length"] > 0
    assert "SDPG, no PG term" in (out / "results.md").read_text()
    mtime = os.path.getmtime(run / "summary.json")
    again = _rpm(*args, timeout=300)  # a finished run (summary.json) is reused, not retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert os.path.getmtime(run / "summary.json") == mtime
    assert json.loads((out / "results.json").read_text())["runs"] == result["runs"]


@pytest.mark.timeout(300)
def test_sigterm_stops_the_run_tree_by_pid(tiny_task_model, tmp_path):
    """SIGTERM to the script mid-run stops torchrun, its ranks and the CPU server it started (none outlive it)."""
    import signal
    import time

    import psutil

    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "reproduce_paper_mini.py"), "--methods", "grpo",
           "--seeds", "1", "--steps", "500", "--eval-n", "4", "--meank", "0", "--prompts", "2", "--samples", "2",
           "--model-dir", tiny_task_model[0], "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    me = psutil.Process(proc.pid)

    def server_started() -> bool:
        for child in me.children(recursive=True):
            try:
                if "rollout.server" in " ".join(child.cmdline()):
                    return True
            except psutil.Error:  # exited meanwhile
                pass
        return False

    tree: list = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not server_started():
            time.sleep(0.5)
        tree = me.children(recursive=True)
        assert len(tree) >= 4, [c.cmdline()[:4] for c in tree]  # torchrun, 2 ranks, the CPU server
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [p.cmdline()[:4] for p in alive]
    finally:  # whatever failed above, nothing of the run outlives the test
        for p in [me, *tree]:
            try:
                p.kill()
            except psutil.Error:
                pass
