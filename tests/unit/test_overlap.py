"""The pieces of rollout.off_policy_steps=1 that need no engine (train/overlap.py)."""

import threading

import pytest

from megatron_sdpg.train.overlap import BackgroundCall, weight_version_number


def test_weight_version_number_is_the_oldest_reported_step_count():
    assert weight_version_number(["3", "3"]) == 3
    assert weight_version_number(["4", "3", "4"]) == 3  # mixed: the oldest
    assert weight_version_number(["default", "default"]) == 0  # the weights the engines started with
    assert weight_version_number([None, "3"]) is None  # an engine that reports none
    assert weight_version_number(["v3"]) is None  # not a step count
    assert weight_version_number([]) is None


def test_background_call_returns_or_reraises_in_the_caller_and_does_not_block_exit():
    release = threading.Event()
    call = BackgroundCall(lambda: release.wait(30) and "batch", name="t-ok")
    assert not call.done()
    with pytest.raises(TimeoutError, match="t-ok still running"):
        call.result(timeout_s=0.01)
    assert call._thread.daemon  # a run that fails elsewhere exits with the batch still in flight
    release.set()
    assert call.result(timeout_s=30) == "batch" and call.done()

    def fail():
        raise ConnectionError("engine gone")

    with pytest.raises(ConnectionError, match="engine gone"):
        BackgroundCall(fail, name="t-err").result(timeout_s=30)
