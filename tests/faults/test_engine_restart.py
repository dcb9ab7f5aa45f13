"""An engine killed mid-run (SIGKILL by PID) is restarted and the run completes correctly (issue 17, item 12).

A real run (torchrun, one rank, tensor sync, the tiny task model) whose only
engine is killed right after step 0 (so after its weights were synced): the
launcher restarts it through the client's failure hook (or before the next
sync), the trainer syncs the current weights to it and redoes the batch (no
sample from the restarted engine's initial weights is used), and the run exits 0 with every step's full batch of samples (none lost, none twice) and
the engine at the final weight version.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

from megatron_sdpg.testing.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
STEPS, PROMPTS, N = 3, 4, 4


def _step_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    return [r for r in lines if not r.get("final")]


def test_engine_killed_mid_run_is_restarted_without_losing_samples(tiny_task_model, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           "-m", "megatron_sdpg.train", "--config", CONFIG, f"model.hf_dir={tiny_task_model[0]}",
           f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.eval_n=4", "train.eval_every=0",
           f"train.prompts_per_step={PROMPTS}", f"rollout.n_samples={N}", "rollout.sampling.max_new_tokens=32",
           "parallel.tp=1", f"rollout.base_port={port}", "rollout.backoff_s=0.1", "logging.progress_bar=false",
           "reward.workers=1"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while not _step_records(str(run_dir / "metrics.jsonl")):  # step 0 done: its weights are synced
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 0"
            time.sleep(0.05)
        (log,) = glob.glob(str(run_dir / "engines" / "engine0_*.log"))
        killed = int(re.search(r" pid (\d+)", open(log).read()).group(1))
        os.kill(killed, signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-5000:]
    # Killed during a rollout: restarted, synced again, batch redone; killed during the update: restarted
    # before the next sync. Never a batch drawn from the restarted engine's initial weights.
    restarts = [line for line in out.splitlines()
                if "syncing it and redoing the batch" in line or "had died; restarted it before syncing" in line]
    assert restarts, out[-3000:]
    print("\n".join(restarts))
    pids = [int(p) for p in re.findall(r" pid (\d+)", open(log).read())]
    assert len(pids) == 2 and pids[0] == killed  # started once, restarted once
    steps = _step_records(str(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert all(r["rollout/samples"] == PROMPTS * N for r in steps), [r["rollout/samples"] for r in steps]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == STEPS and summary["accuracy_after"] is not None
    # The launcher stopped the restarted engine with the run.
    assert not os.path.exists(f"/proc/{pids[1]}") or open(f"/proc/{pids[1]}/stat").read().split(")")[1].split()[0] == "Z"
