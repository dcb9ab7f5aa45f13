"""The Slurm path for real: `sbatch examples/run_sdpg_70b.sh` on the local cluster of tools/local_cluster.sh.

The unchanged 70B script runs with the tiny model, the CPU rollout server
(``ENGINE=cpu``), two training nodes of one gloo rank each and one rollout node,
and the config's own ``sync_strategy: distributed`` (gloo) — only environment
variables and sbatch options differ from a GPU run. The module brings the cluster
up itself (installing Slurm with apt on a fresh machine) and takes it down again
if it started it; it skips, saying why, only where that cannot work (not root, or
neither Slurm nor apt-get).

Asserted per job: it ends COMPLETED; metrics.jsonl holds every step; the engine
reports the trainer's weight version after each step; the post-sync log-prob
probe passed each step; each node has its own log folder; no process of the job
is left afterwards (every PID seen in the job during the run is gone). Then a job
cancelled mid-run with scancel and resubmitted resumes from the last complete
checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "tools", "local_cluster.sh")
SCRIPT = os.path.join(ROOT, "examples", "run_sdpg_70b.sh")
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cluster.yaml")
THRESHOLD = 1e-3  # tiny_cluster.yaml's rollout.post_sync_check_threshold
JOB_TIMEOUT_S = 420


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: tools/local_cluster.sh installs Slurm and starts slurmd as root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "neither Slurm nor apt-get on this machine"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _skip_reason()
    if reason:
        print(f"SKIP tests/cluster: {reason}", flush=True)
        pytest.skip(reason)
    was_up = subprocess.run(["bash", CLUSTER, "status"], capture_output=True, text=True).returncode == 0
    up = subprocess.run(["bash", CLUSTER, "up", "--nodes", "3"], capture_output=True, text=True, timeout=1200)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield
    finally:
        if not was_up:
            down = subprocess.run(["bash", CLUSTER, "down"], capture_output=True, text=True, timeout=300)
            assert down.returncode == 0, down.stdout + down.stderr
            # Stopped by PID, its configuration and /etc/hosts lines gone; a second `down` is a no-op.
            assert subprocess.run(["bash", CLUSTER, "status"], capture_output=True).returncode != 0
            with open("/etc/hosts") as f:
                assert "local_cluster.sh" not in f.read()
            assert subprocess.run(["bash", CLUSTER, "down"], capture_output=True).returncode == 0


def _job_env(run_dir: str, megatron_dir: str, hf_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CONFIG=CONFIG, HF_DIR=hf_dir, ENGINE="cpu", TRAIN_NODES="2", ROLLOUT_NODES="1", RUN_DIR=run_dir,
               MEGATRON_DIR=megatron_dir, HEALTH_POLL_S="2", STOP_GRACE_S="10",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


def _submit(env: dict, out: str, *overrides: str) -> str:
    cmd = ["sbatch", "--parsable", "--nodes=3", f"--output={out}", SCRIPT, *overrides]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job_state(job: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
    m = re.search(r"JobState=(\S+)", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1)


def _job_pids(job: str) -> set[int]:
    """PIDs of the processes whose environment says they belong to Slurm job ``job``."""
    pids = set()
    needle = f"SLURM_JOB_ID={job}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _wait(job: str, seen: set[int], until=lambda: False) -> str:
    """Polls until the job ends (or ``until()``), recording its PIDs; returns the state."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        seen |= _job_pids(job)
        state = _job_state(job)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") or until():
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"job {job} still {_job_state(job)} after {JOB_TIMEOUT_S}s")


def _assert_no_process_left(job: str, seen: set[int]) -> None:
    assert seen, "no process of the job was ever seen"
    deadline = time.monotonic() + 60  # slurmstepd reaps the steps' processes as the job completes
    while time.monotonic() < deadline and (any(_alive(p) for p in seen) or _job_pids(job)):
        time.sleep(1)
    left = sorted(p for p in seen | _job_pids(job) if _alive(p))
    assert not left, f"processes of job {job} left: {left}"


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _engine_versions(run_dir: str) -> list[str]:
    logs = glob.glob(os.path.join(run_dir, "logs", "node003", "engine*_port*.log"))
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return re.findall(r"^weight version: (\S+)$", f.read(), re.M)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return str(tmp_path_factory.mktemp("megatron") / "tiny-megatron")


@pytest.mark.timeout(900)
def test_sbatch_70b_script_runs_end_to_end(cluster, tiny_task_model, converted, tmp_path):
    hf_dir, _ = tiny_task_model
    run_dir = str(tmp_path / "run")
    job = _submit(_job_env(run_dir, converted, hf_dir), str(tmp_path / "job.out"))
    seen: set[int] = set()
    state = _wait(job, seen)
    with open(tmp_path / "job.out") as f:
        out = f.read()
    assert state == "COMPLETED", out[-3000:]
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    # Per-node log folders: the trainer on node001/node002, the engine on node003.
    for node, name in (("node001", "trainer.log"), ("node002", "trainer.log"), ("node001", "convert.log")):
        assert os.path.isfile(os.path.join(run_dir, "logs", node, name)), (node, name)
    # Every step logged, each with a weight sync that passed the post-sync probe.
    rows = _metrics(run_dir)
    steps = [r for r in rows if not r.get("final")]
    assert [r["step"] for r in steps] == [0, 1, 2]
    for r in steps:
        assert r["sync/bytes"] > 0
        assert 0 <= r["sync/probe_max_abs_diff"] <= THRESHOLD, r
    # The engine took the trainer's version after each step (the trainer also read it back).
    assert _engine_versions(run_dir) == ["1", "2", "3"]
    assert "weight sync: distributed" in out
    _assert_no_process_left(job, seen)


def _complete_checkpoints(run_dir: str) -> list[int]:
    found = glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "COMPLETE"))
    return sorted(int(re.search(r"step_(\d+)", p).group(1)) for p in found)


@pytest.mark.timeout(900)
def test_scancel_then_resubmit_resumes_from_the_last_complete_checkpoint(cluster, tiny_task_model, converted,
                                                                          tmp_path):
    hf_dir, _ = tiny_task_model
    run_dir = str(tmp_path / "run")
    env = _job_env(run_dir, converted, hf_dir)
    job = _submit(env, str(tmp_path / "job1.out"), "train.steps=6")
    seen: set[int] = set()
    state = _wait(job, seen, until=lambda: len(_complete_checkpoints(run_dir)) >= 2)
    assert state == "RUNNING", f"job ended ({state}) before it could be cancelled mid-run"
    subprocess.run(["scancel", job], check=True, timeout=30)
    state = _wait(job, seen)
    assert state == "CANCELLED", state
    _assert_no_process_left(job, seen)
    done = _complete_checkpoints(run_dir)
    assert done and done[-1] < 6, done
    last = done[-1]

    job2 = _submit(env, str(tmp_path / "job2.out"), "train.steps=6")
    seen2: set[int] = set()
    state = _wait(job2, seen2)
    with open(tmp_path / "job2.out") as f:
        out = f.read()
    assert state == "COMPLETED", out[-3000:]
    trainer_logs = "".join(open(p).read() for p in glob.glob(os.path.join(run_dir, "logs", "node00*", "trainer.log")))
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', f'step_{last}')} at step {last}" in trainer_logs
    steps = [r["step"] for r in _metrics(run_dir) if not r.get("final")]
    assert steps[-(6 - last):] == list(range(last, 6)) and set(steps) == set(range(6))
    assert _complete_checkpoints(run_dir)[-1] == 6
    _assert_no_process_left(job2, seen2)
