"""Checkpoints and exact resume under torchrun (gloo) with the CPU rollout server.

* Run A trains 4 steps uninterrupted (TP1 DP2, a checkpoint after every step);
  its last checkpoint exports to HF (tools/convert_megatron_to_hf.py) bit-identical
  to the weights the engine received after step 4.
* Run B, same config, is killed with SIGKILL once its step-2 checkpoint is
  complete; a torn write is then injected (a ``step_N.tmp`` and a ``step_99``
  without ``COMPLETE``). The restarted run resumes from the latest complete
  checkpoint, and every step it runs reproduces run A's metrics. Rollout seeds
  derive from (train.seed, step), so identical weights, optimizer state and data
  position give identical rollouts and updates; the tolerance is 1e-6 relative
  (the runs are bit-identical on this machine, the slack is for other BLAS).
* Run A's directory, resumed at TP2 for one more step (then that checkpoint at PP2): the weights and
  optimizer state reshard, and the engine (which received the loaded weights)
  agrees with the trainer's log-probs.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.testing.processes import kill_tree
from megatron_sdpg.train.checkpoint import complete_checkpoints
from megatron_sdpg.train.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
RTOL = 1e-6


@pytest.fixture(scope="module")
def hf_dir(tiny_task_model):
    return tiny_task_model[0]


def _cmd(hf_dir, run_dir, *overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "megatron_sdpg.train", "--config", CONFIG, f"model.hf_dir={hf_dir}", f"train.run_dir={run_dir}",
            "train.steps=4", "train.eval_n=8", "train.eval_every=0", "train.prompts_per_step=4", "rollout.n_samples=4",
            "rollout.sampling.max_new_tokens=32", "rollout.sync_strategy=disk", f"rollout.base_port={free_port()}",
            "logging.progress_bar=false", "parallel.tp=1", "checkpoint.save_every=1", *overrides]


ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _train(hf_dir, run_dir, *overrides, timeout=240):
    proc = subprocess.run(_cmd(hf_dir, run_dir, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _hf_tensors(hf_dir: str) -> dict:
    out = {}
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


def _assert_same(resumed: dict, reference: dict) -> None:
    for key in ("loss", "reward", "grad_norm", "rollout_logp_abs_diff", "distill_kl"):
        a, b = resumed[key], reference[key]
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12), (resumed["step"], key, a, b)


def test_kill_resume_and_reshard(hf_dir, tmp_path):
    run_a = str(tmp_path / "a")
    _train(hf_dir, run_a)
    ref = {r["step"]: r for r in read_metrics(run_a) if not r.get("final")}
    assert sorted(ref) == [0, 1, 2, 3]
    assert [s for s, _ in complete_checkpoints(run_a)] == [3, 4]  # keep_last=2

    # Any checkpoint exports to HF through the converter: step 4's weights are what the engine got as v4.
    exported = str(tmp_path / "a_step4_hf")
    conv = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_megatron_to_hf.py"), "--megatron-dir",
                           os.path.join(run_a, "checkpoints", "step_4", "dist"), "--hf-dir", exported],
                          capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert conv.returncode == 0, conv.stderr[-3000:]
    synced = _hf_tensors(os.path.join(run_a, "weight_sync", "v4"))
    ours = _hf_tensors(exported)
    assert set(ours) == set(synced)
    assert all(torch.equal(ours[k], synced[k]) for k in ours)
    assert os.path.isfile(os.path.join(exported, "tokenizer.json"))

    # Run B: SIGKILL once the step-2 checkpoint is complete.
    run_b = str(tmp_path / "b")
    proc = subprocess.Popen(_cmd(hf_dir, run_b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while not any(s >= 2 for s, _ in complete_checkpoints(run_b)):
            assert proc.poll() is None, f"run B exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "run B wrote no step-2 checkpoint in time"
            time.sleep(0.2)
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=30)
    latest = complete_checkpoints(run_b)[-1][0]
    assert latest in (2, 3, 4)
    # A torn write: a temp dir and a final-named dir, neither with COMPLETE.
    ckpts = os.path.join(run_b, "checkpoints")
    os.makedirs(os.path.join(ckpts, f"step_{latest + 1}.tmp", "dist"), exist_ok=True)
    os.makedirs(os.path.join(ckpts, "step_99", "dist"))
    with open(os.path.join(ckpts, "step_99", "trainer_state.json"), "w") as f:
        f.write("{truncated")

    proc = _train(hf_dir, run_b)
    assert f"resumed from {os.path.join(ckpts, f'step_{latest}')} at step {latest}" in proc.stdout, proc.stdout[-2000:]
    resumed = {r["step"]: r for r in read_metrics(run_b) if not r.get("final")}
    assert sorted(resumed) == [0, 1, 2, 3]
    for step in range(4):
        _assert_same(resumed[step], ref[step])
    assert json.load(open(os.path.join(run_b, "summary.json")))["steps"] == 4

    # Run A's checkpoint resumed at TP2 for one more step.
    run_c = str(tmp_path / "c")
    shutil.copytree(run_a, run_c)
    proc = _train(hf_dir, run_c, "parallel.tp=2", "train.steps=5")
    assert "at step 4" in proc.stdout, proc.stdout[-2000:]
    last = {r["step"]: r for r in read_metrics(run_c) if not r.get("final")}[4]
    assert last["rollout_logp_abs_diff"] < 1e-4, last["rollout_logp_abs_diff"]
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"]) and last["skipped_updates"] == 0

    # The TP2 checkpoint just written, resumed at PP2 for one more step.
    run_d = str(tmp_path / "d")
    shutil.copytree(run_c, run_d)
    proc = _train(hf_dir, run_d, "parallel.tp=1", "parallel.pp=2", "train.steps=6")
    assert "at step 5" in proc.stdout, proc.stdout[-2000:]
    last = {r["step"]: r for r in read_metrics(run_d) if not r.get("final")}[5]
    assert last["rollout_logp_abs_diff"] < 1e-4, last["rollout_logp_abs_diff"]
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"]) and last["skipped_updates"] == 0
