"""The verifier pool: rewards by config, timeouts, errors, dead workers, and a fuzz."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.rewards.config import RewardConfig
from megatron_sdpg.rewards.pool import VerifierPool

SLACK_S = 2.0  # worker restart after a kill + scheduling on a busy 2-core machine


@pytest.fixture(scope="module")
def numeric_pool():
    with VerifierPool("numeric", RewardConfig(timeout_s=1.0, workers=2)) as pool:
        yield pool


def test_binary_and_signed_rewards():
    responses, answers = ["\\boxed{3}", "\\boxed{4}"], ["3", "3"]
    with VerifierPool("numeric", RewardConfig()) as pool:
        batch = pool.score(responses, answers)
    assert batch.rewards == [1.0, 0.0] and batch.correct == [True, False]
    with VerifierPool("numeric", RewardConfig(correct_reward=1.0, wrong_reward=-1.0)) as pool:
        assert pool.score(responses, answers).rewards == [1.0, -1.0]


def test_timeout_kills_the_call_and_gives_failure_reward():
    cfg = RewardConfig(timeout_s=0.5, workers=2, wrong_reward=-1.0, failure_reward=-0.5)
    with VerifierPool("tests.unit.plugin_verifiers:sleepy", cfg) as pool:
        start = time.monotonic()
        batch = pool.score(["30", "0", "30"], ["30", "0", "x"])
        elapsed = time.monotonic() - start
        assert batch.timeouts == 2 and batch.errors == 0
        assert batch.rewards == [-0.5, 1.0, -0.5]
        assert elapsed < 0.5 * 2 + SLACK_S
        # the pool recovers: killed workers were replaced
        assert pool.score(["0"], ["0"]).rewards == [1.0]


@pytest.mark.parametrize("plugin", ["raises", "dies"])
def test_errors_and_dead_workers_are_counted(plugin):
    with VerifierPool(f"tests.unit.plugin_verifiers:{plugin}", RewardConfig(timeout_s=5.0)) as pool:
        batch = pool.score(["a", "b"], ["a", "b"])
    assert batch.errors == 2 and batch.timeouts == 0
    assert batch.rewards == [0.0, 0.0] and batch.correct == [False, False]
    assert batch.first_error


def test_busy_loop_is_killed():
    with VerifierPool("tests.unit.plugin_verifiers:spins", RewardConfig(timeout_s=0.5)) as pool:
        start = time.monotonic()
        batch = pool.score(["x"], ["x"])
    assert batch.timeouts == 1 and time.monotonic() - start < 0.5 + SLACK_S


def test_bad_verifier_fails_at_construction():
    with pytest.raises(ValueError, match="unknown verifier"):
        VerifierPool("no-such-verifier")


def test_reward_config_validate():
    RewardConfig().validate("reward")
    with pytest.raises(ConfigError, match=r"^reward\.timeout_s:"):
        RewardConfig(timeout_s=0).validate("reward")
    with pytest.raises(ConfigError, match=r"^reward\.correct_reward:"):
        RewardConfig(correct_reward=0.0, wrong_reward=0.0).validate("reward")
    with pytest.raises(ConfigError, match=r"^reward\.verifier:"):
        RewardConfig(verifier="bogus").validate("reward")
    assert RewardConfig(wrong_reward=-1.0).reward_on_failure == -1.0


ADVERSARIAL = [
    "\\boxed{" * 5000,
    "}" * 5000 + "\\boxed{1}",
    "1" * 200_000,
    "\\boxed{" + "9" * 100_000 + "}",
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "\\boxed{(x+1)^{99999}-(x+1)^{99999}}",
    "\\boxed{10!!!!!!!!}",
    "#### " + "-" * 10_000,
    "\x00\ud7ff\U0001f600" * 1000,
    "$" * 10_000,
    "\\boxed{\\begin{pmatrix}" + "1&" * 2000 + "\\end{pmatrix}}",
]
TEXT = st.one_of(
    st.text(max_size=300),
    st.sampled_from(ADVERSARIAL),
    st.builds(lambda a, b: a + b, st.sampled_from(ADVERSARIAL), st.text(max_size=50)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(responses=st.lists(TEXT, min_size=1, max_size=4), answer=st.sampled_from(["168", "1/2", "x", ""]))
def test_fuzz_numeric_and_exact_never_raise_or_hang(numeric_pool, responses, answer):
    start = time.monotonic()
    batch = numeric_pool.score(responses, [answer] * len(responses))
    assert len(batch.rewards) == len(responses)
    assert batch.errors == 0
    assert time.monotonic() - start < 1.0 * -(-len(responses) // 2) + SLACK_S


def test_fuzz_math_adversarial_each_call_bounded():
    timeout = 1.5
    with VerifierPool("math", RewardConfig(timeout_s=timeout, workers=2)) as pool:
        pool.score(["\\boxed{1}"], ["1"])  # warm the workers (sympy import)
        for response in ADVERSARIAL:
            start = time.monotonic()
            batch = pool.score([response], ["1"])
            assert time.monotonic() - start < timeout + SLACK_S, response[:40]
            assert batch.rewards == [0.0] or batch.correct == [True]
        assert pool.score(["\\boxed{\\frac{2}{4}}"], ["0.5"]).rewards == [1.0]
