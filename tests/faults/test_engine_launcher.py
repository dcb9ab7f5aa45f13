"""The launcher uses only engines it started, serving its model, and they die with it (issue 17, items 3 and 4).

* 3: a stale server of another model on the engine port makes ``start_all`` fail
  with one line naming the port (it used to be taken for our engine, and the run
  trained against the wrong weights); ``verify_engine`` refuses an engine serving
  another ``model_path``, another process, or other weights than the checkpoint.
* 4: the engine of a process killed by SIGTERM (torchrun's stop, scancel) or
  SIGKILL is gone (checked by PID), also when a short-lived thread started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import save_file

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.rollout.config import RolloutConfig
from megatron_sdpg.rollout.launcher import EngineLauncher
from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.testing.rollout import random_like_state, start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model
from tests.faults.httpcall import call

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    return build_tiny_llama(str(root / "a"), seed=0), build_tiny_llama(str(root / "b"), seed=1), root


def test_stale_server_on_the_port_is_refused(models):
    a, b, root = models
    stale = start_cpu_server(b, str(root / "stale_logs"))
    port = int(stale.url.rsplit(":", 1)[1])
    cfg = RolloutConfig(engine="cpu", model_path=a, base_port=port, log_dir=str(root / "logs"),
                        startup_timeout_s=120.0, sglang_args={"threads": 1})
    launcher = EngineLauncher(cfg)
    try:
        with pytest.raises(ConfigError) as err:
            launcher.start_all()
        message = str(err.value)
        assert message.startswith("rollout.base_port:") and f"port {port}" in message and "\n" not in message
        assert not any(e.alive() for e in launcher.engines)
        assert stale.alive() and call(stale.url, "/health", timeout=10.0)[0] == 200  # not ours: left alone
    finally:
        launcher.stop_all()
        stale.stop(grace_s=2.0)


def test_verify_engine_refuses_other_model_process_or_weights(models, tmp_path):
    from megatron_sdpg.rollout.launcher import verify_engine

    a, b, root = models
    c = build_tiny_llama(str(tmp_path / "c"), seed=2)  # this test rewrites c's weights below
    engine = start_cpu_server(c, str(tmp_path / "logs"))
    try:
        verify_engine(engine.url, c, engine.pid)  # ours, right model, right weights
        with pytest.raises(ConfigError, match=f"serves {c}, not {a}"):
            verify_engine(engine.url, a, engine.pid)
        with pytest.raises(ConfigError, match="not the engine this run started"):
            verify_engine(engine.url, c, engine.pid + 1)
        save_file(random_like_state(load_hf_model(c), seed=9), os.path.join(c, "model.safetensors"))
        with pytest.raises(ConfigError, match="serves other weights"):
            verify_engine(engine.url, c, engine.pid)
    finally:
        engine.stop(grace_s=2.0)


_PARENT = textwrap.dedent("""
    import sys, threading, time
    from megatron_sdpg.rollout.config import RolloutConfig
    from megatron_sdpg.rollout.launcher import EngineLauncher

    cfg = RolloutConfig(engine="cpu", model_path=sys.argv[1], base_port=int(sys.argv[2]), log_dir=sys.argv[3],
                        startup_timeout_s=120.0, sglang_args={"threads": 1})
    launcher = EngineLauncher(cfg)
    starter = threading.Thread(target=launcher.start_all)  # as the client's failure hook restarts engines
    starter.start()
    starter.join()
    print(launcher.engines[0].pid, launcher.engines[0].url, flush=True)
    time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie no one has reaped yet
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_engine_dies_with_its_launcher(models, tmp_path, sig):
    a, _, _ = models
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, a, str(free_port()), str(tmp_path / "logs")],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    engine_pid = None
    try:
        line = parent.stdout.readline()  # the parent exits (EOF) if the start fails
        assert line, f"the parent failed to start its engine (rc {parent.wait(30)})"
        engine_pid, url = int(line.split()[0]), line.split()[1]
        assert call(url, "/health", timeout=10.0)[0] == 200  # alive after the thread that started it ended
        os.kill(parent.pid, sig)
        parent.wait(30)
        deadline = time.monotonic() + 30
        while not _gone(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(engine_pid), f"engine pid {engine_pid} outlived its launcher (killed by {sig.name})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        if engine_pid is not None and not _gone(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)  # the orphan of a failed run, by its PID
