"""An engine killed mid-batch (SIGKILL by PID): the batch still completes, every sample once.

Two cases: fail-over to a second engine, and a single engine restarted by the
launcher through the client's failure hook.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.config import RolloutConfig, SamplingConfig
from megatron_sdpg.rollout.launcher import EngineLauncher
from megatron_sdpg.testing.distributed import free_port
from megatron_sdpg.testing.tiny_hf import build_tiny_llama

GROUPS, N = 24, 2
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=300, ignore_eos=True, seed=11)
PROMPTS = [[2, 10 + g, 20 + g] for g in range(GROUPS)]


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    root = tmp_path_factory.mktemp("failover")
    cfg = RolloutConfig(engine="cpu", model_path=build_tiny_llama(str(root / "tiny")), num_engines=2,
                        base_port=free_port(2), log_dir=str(root / "logs"), startup_timeout_s=120.0,
                        backoff_s=0.1, sglang_args={"threads": 1})
    cfg.validate("rollout")
    with EngineLauncher(cfg) as launcher:
        launcher.start_all()  # both engines start at once
        yield launcher
    assert not any(e.alive() for e in launcher.engines)


def _assert_complete(groups, batch_id):
    rids = [s.rid for g in groups for s in g]
    assert rids == [f"{batch_id}-g{g}-s{k}" for g in range(GROUPS) for k in range(N)]  # none lost, none twice
    for g, grp in enumerate(groups):
        for s in grp:
            assert s.prompt_ids == PROMPTS[g] and len(s.output_ids) == 300 and len(s.logprobs) == 300


def _kill_when_busy(client, engine_pid, batch_id):
    fut = client.submit(client.aclient.generate(PROMPTS, SAMPLING, n=N, batch_id=batch_id))
    time.sleep(0.1)  # the requests are in flight; the batch takes seconds even on an idle machine
    assert not fut.done(), "the batch finished before the kill; make it longer"
    os.kill(engine_pid, signal.SIGKILL)
    return fut.result(timeout=120)


def test_failover_to_second_engine(launcher):
    a, b = launcher.engines
    client = RolloutClient.from_config(launcher.cfg, [a.url, b.url])
    try:
        groups, metrics = _kill_when_busy(client, a.pid, "fo")
    finally:
        client.close()
    _assert_complete(groups, "fo")
    assert metrics["rollout/retries"] >= 1
    assert any(s.engine == b.url for g in groups for s in g)
    assert not a.alive()


def test_restart_by_launcher(launcher):
    engine = launcher.engines[1]
    first_pid = engine.pid
    client = RolloutClient.from_config(launcher.cfg, [engine.url], on_engine_failure=launcher.restart_if_dead)
    try:
        groups, metrics = _kill_when_busy(client, first_pid, "rs")
    finally:
        client.close()
    _assert_complete(groups, "rs")
    assert engine.alive() and engine.pid != first_pid
    assert metrics["rollout/retries"] >= 1
