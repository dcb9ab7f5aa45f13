"""Run-directory faults under torchrun (2 ranks, gloo, the CPU rollout server).

* Corrupt latest checkpoints (step 4: a ``.distcp`` of the right size that does not
  unpickle, found only by the load itself on both ranks; step 3: an empty
  ``trainer_state.json``; step 2: a deleted shard) are each named in one line and
  skipped: both ranks resume from step 1 and finish with exit 0; the corrupt ones
  are renamed ``step_N.corrupt``, not deleted.
* ``checkpoint.resume=false`` in that used run directory starts a new run: the old
  run's files move to ``previous_runs/1/`` (nothing deleted), ``keep_last`` keeps the
  new run's checkpoints (the old run's higher step numbers used to outrank them),
  the checkpoint a later resume loads is the new run's, and ``metrics.jsonl`` holds
  the new run only.
* The post-sync probe runs after every sync (``sync/probe_max_abs_diff`` per step).
* :func:`checkpoint_problem` names a deleted shard, a truncated ``.distcp`` and an
  empty ``trainer_state.json``.
"""

import json
import os
import shutil
import subprocess
import sys

from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.train.checkpoint import checkpoint_problem, complete_checkpoints
from megatron_sdpg.train.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _train(hf_dir, run_dir, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megatron_sdpg.train", "--config", CONFIG, f"model.hf_dir={hf_dir}", f"train.run_dir={run_dir}",
           "train.eval_n=4", "train.eval_every=0", "train.prompts_per_step=2", "rollout.n_samples=2",
           "rollout.sampling.max_new_tokens=16", "rollout.sync_strategy=disk", f"rollout.base_port={free_port()}",
           "logging.progress_bar=false", "parallel.tp=1", "checkpoint.save_every=1", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


def _step_of(path):
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)["step"]


def test_corrupt_latest_checkpoint_is_skipped_then_resume_false_starts_a_new_run(tiny_task_model, tmp_path):
    hf_dir = tiny_task_model[0]
    run = str(tmp_path / "run")
    _train(hf_dir, run, "train.steps=4", "checkpoint.keep_last=4")
    ckpts = os.path.join(run, "checkpoints")
    assert [s for s, _ in complete_checkpoints(run)] == [1, 2, 3, 4]
    # The post-sync probe ran after every sync: the trainer's Megatron log-probs of the probe vs the engine's.
    steps = [r for r in read_metrics(run) if not r.get("final")]
    assert len(steps) == 4 and all(0 <= r["sync/probe_max_abs_diff"] < 1e-4 for r in steps), steps

    def distcp(step):
        d = os.path.join(ckpts, f"step_{step}", "dist")
        return os.path.join(d, sorted(n for n in os.listdir(d) if n.endswith(".distcp"))[-1])

    with open(distcp(4), "r+b") as f:  # whole-sized but unreadable: only the load itself finds it (on both ranks)
        f.write(bytes(4096))
    open(os.path.join(ckpts, "step_3", "trainer_state.json"), "w").close()
    os.remove(distcp(2))
    proc = _train(hf_dir, run, "train.steps=4", "checkpoint.keep_last=4")
    out = proc.stdout
    assert f"checkpoint {os.path.join(ckpts, 'step_4')} is corrupt" in out and "UnpicklingError" in out, out
    assert f"checkpoint {os.path.join(ckpts, 'step_3')} is corrupt" in out and "trainer_state.json" in out, out
    assert f"checkpoint {os.path.join(ckpts, 'step_2')} is corrupt" in out and "missing" in out, out
    assert out.count("is corrupt and is skipped") == 3, out  # one line each, not one per rank
    assert f"resumed from {os.path.join(ckpts, 'step_1')} at step 1" in out, out
    for step in (2, 3, 4):
        assert os.path.isdir(os.path.join(ckpts, f"step_{step}.corrupt"))
    assert [s for s, _ in complete_checkpoints(run)] == [1, 2, 3, 4]

    # Starting over in the used directory: the old run is moved aside, the new one keeps its checkpoints.
    old_metrics = read_metrics(run)
    proc = _train(hf_dir, run, "train.steps=2", "checkpoint.resume=false", "checkpoint.keep_last=2")
    moved = os.path.join(run, "previous_runs", "1")
    assert f"moved its files" in proc.stdout and moved in proc.stdout, proc.stdout
    assert [s for s, _ in complete_checkpoints(moved)] == [1, 2, 3, 4]
    assert read_metrics(moved) == old_metrics
    found = complete_checkpoints(run)
    assert [s for s, _ in found] == [1, 2], found
    assert _step_of(found[-1][1]) == 2  # what a later resume loads: the new run's step 2
    assert [r["step"] for r in read_metrics(run) if not r.get("final")] == [0, 1]


def test_checkpoint_problem_names_each_corruption(tiny_task_model, tmp_path):
    """The file checks (no trainer): a whole checkpoint passes, each corruption is named."""
    from megatron_sdpg.weights.checkpoint import check_checkpoint_files

    meg = str(tmp_path / "meg")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_megatron.py"), "--no-progress",
                           "--hf-dir", tiny_task_model[0], "--megatron-dir", meg], capture_output=True, text=True,
                          timeout=180, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_checkpoint_files(meg)
    ckpt = tmp_path / "step_1"
    shutil.copytree(meg, ckpt / "dist")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "scheduler": {}, "source": {}, "world_size": 1}))
    assert checkpoint_problem(str(ckpt)) is None
    shard = [p for p in (ckpt / "dist").iterdir() if p.suffix == ".distcp"][0]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    assert "truncated" in checkpoint_problem(str(ckpt)) and shard.name in checkpoint_problem(str(ckpt))
    shard.unlink()
    assert checkpoint_problem(str(ckpt)).endswith(f"{shard.name}: missing (named by the checkpoint's .metadata)")
    shard.write_bytes(data)
    (ckpt / "trainer_state.json").write_text("")
    assert "trainer_state.json: unreadable" in checkpoint_problem(str(ckpt))
