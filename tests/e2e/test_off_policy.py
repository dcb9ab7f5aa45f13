"""``rollout.off_policy_steps=1`` end to end (torchrun, gloo, the CPU rollout server).

* A 3-step run: every batch after the first was generated with the weights one
  version behind the trainer's (the engine's reported version), the rollout log-probs
  then differ from the current policy's, and the correction enters the loss
  (``tis_weight`` and ``sg_rho`` away from 1). The step-2 checkpoint, written while
  step 2's batch was already generated, records the prompt position before that batch.
* Resumed twice from that checkpoint (one step more): the prefetched batch is
  regenerated on-policy from the same prompts and seed (staleness 0), the next is one
  step stale again, and the two resumed runs agree exactly (deterministic).
* Faults do not hang: a refused weight sync (the post-sync probe) and an engine killed
  during the run end the run with a non-zero status well within the hard timeout.
* It learns (``slow``): the embedded CPU default (``examples/configs/tiny_cpu.yaml`` and its
  warm-started model, ``artifacts/tiny_model``, built by ``examples/run_tiny_cpu.sh`` or
  ``tools/make_tiny_model.py``; ``SDPG_TINY_MODEL`` points elsewhere) at off_policy_steps=1
  raises held-out greedy accuracy in 40 steps (DP2).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.testing.processes import kill_tree
from megatron_sdpg.testing.rollout import start_cpu_server
from benchmarks.bench_vs_trl import project_steps
from megatron_sdpg.train.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
PROMPTS, N = 4, 4


def _cmd(hf_dir, run_dir, *overrides, nproc=1):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", "megatron_sdpg.train", "--config", CONFIG, f"model.hf_dir={hf_dir}", f"train.run_dir={run_dir}",
            "train.steps=3", "train.eval_n=8", "train.eval_every=0", f"train.prompts_per_step={PROMPTS}",
            f"rollout.n_samples={N}", "rollout.sampling.max_new_tokens=32", f"rollout.base_port={free_port()}",
            "logging.progress_bar=false", "parallel.tp=1", "rollout.off_policy_steps=1",
            # a larger step than the default's, so that one version of staleness shows in the log-probs
            "optimizer.lr=1e-3", *overrides]


def _train(hf_dir, run_dir, *overrides, timeout=400):
    proc = subprocess.run(_cmd(hf_dir, run_dir, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [r for r in read_metrics(run_dir) if not r.get("final")]


@pytest.mark.timeout(1200)  # three short runs: ~13 min with the fixture on a machine at load 35
def test_batches_are_one_version_behind_the_correction_applies_and_resume_is_deterministic(tiny_task_model,
                                                                                          tmp_path):
    hf_dir = tiny_task_model[0]
    run = str(tmp_path / "run")
    steps = _train(hf_dir, run, "checkpoint.save_every=2")
    assert [r["step"] for r in steps] == [0, 1, 2]
    # The engines report the version that generated each batch: 0 (start), 0 (during step 0), 1 (during step 1).
    assert [r["rollout/weight_version"] for r in steps] == [0, 0, 1]
    assert [r["rollout/staleness"] for r in steps] == [0, 1, 1]
    assert all(r["rollout/samples"] == PROMPTS * N and r["skipped_updates"] == 0 for r in steps)
    assert "tis_cap: 2.0" in open(os.path.join(run, "config.yaml")).read()  # filled in by off_policy_steps=1
    # Step 0 is on-policy: the engine's log-probs are the trainer's and every weight is 1.
    assert steps[0]["rollout_logp_abs_diff"] < 1e-4
    assert abs(steps[0]["tis_weight"] - 1) < 1e-4 and abs(steps[0]["sg_rho"] - 1) < 1e-4
    for r in steps[1:]:
        # pi_old is the current policy (one update per batch), the rollout log-probs the stale engine's:
        # they differ, and the loss weighs the policy gradient and the KL terms by their ratio.
        assert r["rollout_logp_abs_diff"] > 1e-3, r["rollout_logp_abs_diff"]
        assert abs(r["tis_weight"] - 1) > 1e-4 and abs(r["sg_rho"] - 1) > 1e-4, (r["tis_weight"], r["sg_rho"])
        assert r["sg_rho_max"] > 1
    # Steps 0 and 1 waited for the next batch before their sync; the last step started none.
    assert steps[0]["time/next_batch_wait_s"] >= 0 and steps[1]["time/next_batch_wait_s"] >= 0
    assert "time/next_batch_wait_s" not in steps[2]
    # benchmarks/bench_vs_trl.py's split of these steps: generation on the step's own path is step 0's rollout
    # plus each wait for the overlapped next batch; the parts add up to the step and none is negative.
    split = project_steps(steps)
    assert [("generation_overlapped_s" in s) for s in split] == [False, True, True]
    for r, s in zip(steps, split):
        own = r["rollout/gen_time_s"] if r["rollout/staleness"] == 0 else 0.0
        assert math.isclose(s["generation_s"], own + r.get("time/next_batch_wait_s", 0.0))
        assert min(s["generation_s"], s["reference_s"], s["update_s"], s["other_s"]) >= 0, s
        assert math.isclose(s["generation_s"] + s["reference_s"] + s["update_s"] + s["other_s"], s["step_s"])
    # The step-2 checkpoint holds the prompt position after two batches, not after the prefetched third.
    state = json.load(open(os.path.join(run, "checkpoints", "step_2", "trainer_state.json")))
    assert state["source"]["index"] == 2 * PROMPTS, state["source"]

    resumed = []
    for name in ("b", "c"):
        copy = str(tmp_path / name)
        shutil.copytree(run, copy)
        shutil.rmtree(os.path.join(copy, "checkpoints", "step_3"))  # resume from step 2 (our own copy)
        resumed.append({r["step"]: r for r in _train(hf_dir, copy, "train.steps=4")})
    b, c = resumed
    assert b[2]["rollout/weight_version"] == 2 and b[2]["rollout/staleness"] == 0  # regenerated on-policy
    assert b[3]["rollout/weight_version"] == 2 and b[3]["rollout/staleness"] == 1
    assert b[2]["rollout_logp_abs_diff"] < 1e-4 < b[3]["rollout_logp_abs_diff"]
    # Same prompts as the uninterrupted run's step 2 (its prompt token count), other weights.
    assert b[2]["rollout/prompt_tokens"] == steps[2]["rollout/prompt_tokens"]
    for step in (2, 3):
        for key in ("loss", "grad_norm", "reward", "rollout_logp_abs_diff", "tis_weight", "rollout/completion_tokens"):
            assert b[step][key] == c[step][key], (step, key, b[step][key], c[step][key])


def _dies_within_timeout(cmd, run_dir, timeout=300, kill_engine=None):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    try:
        if kill_engine is not None:
            path = os.path.join(run_dir, "metrics.jsonl")
            deadline = time.monotonic() + timeout
            while not (os.path.exists(path) and open(path).read().strip()):  # step 0 done, step 1 generating
                assert proc.poll() is None and time.monotonic() < deadline, "ended or stalled before step 0"
                time.sleep(0.05)
            kill_engine()
        out, _ = proc.communicate(timeout=timeout)  # a hang fails here
    finally:
        if proc.poll() is None:  # a hung run is stopped with its ranks and their workers (own sessions)
            kill_tree(proc.pid)
            proc.communicate(timeout=60)
    return proc.returncode, out


def test_refused_weight_sync_ends_the_run_instead_of_hanging(tiny_task_model, tmp_path):
    """The first sync comes after the prefetched batch finished; its probe check fails (a threshold no
    fp32 forward meets), and both ranks exit."""
    run = str(tmp_path / "run")
    rc, out = _dies_within_timeout(_cmd(tiny_task_model[0], run, "rollout.post_sync_check_threshold=1e-12",
                                        "train.steps=4", nproc=2), run)
    assert rc != 0, out[-3000:]
    assert any(line.startswith("weight sync error:") for line in out.splitlines()), out[-3000:]


def test_engine_killed_during_the_overlap_ends_the_run_instead_of_hanging(tiny_task_model, tmp_path):
    """Engines given by URL are not restarted: the background generation fails after its retries and the
    run exits with the engine named, instead of waiting for a batch that never comes."""
    run = str(tmp_path / "run")
    engine = start_cpu_server(tiny_task_model[0], str(tmp_path / "logs"))
    try:
        cmd = _cmd(tiny_task_model[0], run, f"rollout.urls=[{engine.url}]", "rollout.max_retries=1",
                   "rollout.backoff_s=0.1", "rollout.request_timeout_s=30", "train.steps=6", nproc=2)
        rc, out = _dies_within_timeout(cmd, run, kill_engine=lambda: os.kill(engine.pid, signal.SIGKILL))
    finally:
        engine.stop(grace_s=2.0)
    assert rc != 0, out[-3000:]
    assert engine.url in out, out[-3000:]
    assert len([r for r in read_metrics(run) if not r.get("final")]) < 6


TINY_MODEL = os.environ.get("SDPG_TINY_MODEL", os.path.join(ROOT, "artifacts", "tiny_model"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not os.path.isfile(os.path.join(TINY_MODEL, "sdpg_task.json")),
                    reason=f"needs the embedded default's warm-started model at {TINY_MODEL} "
                           "(bash examples/run_tiny_cpu.sh or tools/make_tiny_model.py --out artifacts/tiny_model)")
def test_one_step_off_policy_learns_on_the_embedded_default(tmp_path):
    """40 steps of the embedded default (SDPG, 16 prompts x 8 samples, lr 3e-5) at off_policy_steps=1.

    Measured on the shared 2-core machine (artifacts/tiny_model of this checkout, 500 held-out problems):
    14.6% -> 16.4% (step 20) -> 18.2% (step 40); the same run on-policy: 14.6% -> 16.6% -> 18.0%.
    """
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megatron_sdpg.train", "--config", CONFIG, f"model.hf_dir={TINY_MODEL}", f"train.run_dir={run}",
           "train.steps=40", "train.eval_every=0", "parallel.tp=1", "rollout.off_policy_steps=1",
           f"rollout.base_port={free_port()}", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1100, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [r for r in read_metrics(run) if not r.get("final")]
    assert len(steps) == 40 and all(r["rollout/staleness"] == (0 if r["step"] == 0 else 1) for r in steps)
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.02, summary
