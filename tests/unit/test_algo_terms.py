"""Advantages and per-token loss terms against small hand-computed examples."""

import math

import pytest
import torch

from megatron_sdpg.algo.advantages import (
    group_advantages,
    informative_groups,
    kl_penalized_rewards,
    overlong_penalty,
    verifier_rewards,
)
from megatron_sdpg.algo.loss_terms import aggregate, beta_schedule, ppo_clip_loss, reference_kl_term, truncated_is_weight


def test_group_advantages_std_normalised_and_all_equal_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # Group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.5773502692; group 2: all equal -> 0.
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(r, 4), expected, rtol=0, atol=1e-6)
    # Dr.GRPO: mean-centred only.
    torch.testing.assert_close(group_advantages(r, 4, normalize_std=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # +1/-1 rewards: mean 0, std sqrt(4/3) -> +-0.8660; all-equal -1 group -> 0.
    pm = verifier_rewards(torch.tensor([1, 0, 0, 1, 0, 0, 0, 0]), "plus_minus_one")
    assert pm.tolist() == [1, -1, -1, 1, -1, -1, -1, -1]
    b = 1.0 / (math.sqrt(4.0 / 3.0) + 1e-6)
    torch.testing.assert_close(group_advantages(pm, 4), torch.tensor([b, -b, -b, b, 0, 0, 0, 0]), rtol=0, atol=1e-6)
    # G = 1: nothing to compare with -> 0, not NaN.
    assert group_advantages(torch.tensor([1.0, 0.0]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="divisible by group_size=3"):
        group_advantages(r, 3)


def test_reward_shaping_helpers():
    assert verifier_rewards(torch.tensor([True, False])).tolist() == [1.0, 0.0]
    assert informative_groups(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2).tolist() == [True, True, False, False]
    # max 100, buffer 20: 80 -> 0, 90 -> -0.5 * 2, 100 -> -2, 120 -> -2.
    assert overlong_penalty(torch.tensor([50, 80, 90, 100, 120]), 100, 20, 2.0).tolist() == [0, 0, -1.0, -2.0, -2.0]
    # Sequence 0 tokens: k1 0.1 + 0.2 (third token masked), sequence 1: 0.3.
    out = kl_penalized_rewards(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -1.0, -1.0, -1.0]),
                               torch.tensor([-1.1, -1.2, -5.0, -1.3]), torch.tensor([1, 1, 0, 1]),
                               torch.tensor([0, 0, 0, 1]), coef=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.5 * 0.3, -0.5 * 0.3]))
    # k3 of log w = 0.1: exp(-0.1) - 1 + 0.1 = 0.0048374180.
    out = kl_penalized_rewards(torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([-1.1]),
                               torch.tensor([1]), torch.tensor([0]), coef=2.0, estimator="k3")
    assert out.item() == pytest.approx(1.0 - 2.0 * 0.0048374180, rel=1e-6)


def test_ppo_clip_separate_eps_and_dual_clip():
    ratios = torch.tensor([1.5, 0.5, 5.0, 1.0, 0.7])
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0, 1.0])
    logp = torch.log(ratios)
    old = torch.zeros(5)
    loss, clipped, dual = ppo_clip_loss(logp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    # 1.5, A=1: max(-1.5, -1.28) = -1.28 (clipped). 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped).
    # 5.0, A=-1: max(5, 1.28) = 5 -> dual clip min(5, 3) = 3. 1.0, A=2: -2. 0.7, A=1: max(-0.7, -0.8) = -0.7.
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 3.0, -2.0, -0.7]))
    assert clipped.tolist() == [True, True, False, False, False]
    assert dual.tolist() == [False, False, True, False, False]
    loss_nodual, _, dual_off = ppo_clip_loss(logp, old, adv, 0.2, 0.28, None)
    assert loss_nodual[2].item() == pytest.approx(5.0) and not dual_off.any()
    # On-policy the gradient is REINFORCE's: d/dlogp = -A.
    x = torch.zeros(2, requires_grad=True)
    ppo_clip_loss(x, torch.zeros(2), torch.tensor([0.5, -2.0]), 0.2, 0.2)[0].sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, 2.0]))
    torch.testing.assert_close(truncated_is_weight(torch.log(torch.tensor([3.0, 0.5])), torch.zeros(2), 2.0),
                               torch.tensor([2.0, 0.5]))


def test_reference_kl_terms_at_w_equal_two():
    lp, ref = torch.tensor([math.log(2.0)]), torch.tensor([0.0])
    l2 = math.log(2.0)
    expected = {"ufkl": 0.5 + l2, "urkl": 0.5 * l2 ** 2, "fkl": 0.5, "rkl": 0.5 * (l2 + 1) ** 2,
                "k1": l2, "k2": 0.5 * l2 ** 2, "k3": 0.5 - 1 + l2}
    for mode, value in expected.items():
        assert reference_kl_term(lp, ref, mode).item() == pytest.approx(value, rel=1e-6), mode
    # URKL gradient w.r.t. log pi is log w (paper 3.4); UFKL's is 1 - 1/w.
    x = torch.tensor([l2], requires_grad=True)
    reference_kl_term(x, ref, "urkl").backward()
    assert x.grad.item() == pytest.approx(l2)
    x.grad = None
    reference_kl_term(x, ref, "ufkl").backward()
    assert x.grad.item() == pytest.approx(0.5)


def test_beta_schedule_warmup_decay_and_disabled_windows():
    kw = dict(beta_base=1e-3, total_steps=400, warmup_steps=50, decay_steps=350)
    assert beta_schedule(25, **kw) == pytest.approx(0.5e-3)
    assert beta_schedule(50, **kw) == pytest.approx(1e-3)
    assert beta_schedule(225, **kw) == pytest.approx(0.5e-3)
    assert beta_schedule(400, **kw) == 0.0
    assert beta_schedule(450, **kw) == 0.0
    assert beta_schedule(1, 2e-3, 400, 0, 0) == 2e-3
    assert beta_schedule(399, 1.0, 400, 0, 100) == pytest.approx(0.01)


def test_aggregation_modes():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mask = torch.tensor([1, 1, 0, 1, 1])
    seq = torch.tensor([0, 0, 0, 1, 2])
    # 4 sequences, the last one empty.
    cases = {"token-mean": (12.0, 4.0), "seq-mean-token-mean": (1.5 + 4.0 + 5.0, 3.0),
             "seq-mean-token-sum": (12.0, 3.0), "constant": (12.0 / 2.5, 4.0)}
    for mode, (num, den) in cases.items():
        s, n = aggregate(per_token, mask, seq, 4, mode, constant=2.5)
        assert s.item() == pytest.approx(num, rel=1e-7) and n.item() == den, mode
    # Dr.GRPO: the normaliser is a whole number of sequences even for a fractional constant.
    s, n = aggregate(per_token, mask, seq, 4, "constant", constant=2.5)
    assert (s / n).item() == pytest.approx(12.0 / (2.5 * 4), rel=1e-7)
