"""sdpg_loss (Megatron loss contract) and AlgorithmConfig presets.

The expected losses are written out in float64 dense PyTorch in the test itself
(log_softmax over the full vocabulary, the paper's formulas), independent of
the vocab-parallel ops and the loss-term helpers. Tolerance: 1e-5 relative
(fp32 logits through the fp32 ops).
"""

import math

import pytest
import torch

from megatron_sdpg.algo.config import PRESETS, AlgorithmConfig, apply_preset
from megatron_sdpg.algo.losses import LossInputs, reduce_metrics, sdpg_loss
from megatron_sdpg.config.errors import ConfigError

V = 6


def _batch():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(7, V, generator=g) * 2
    t = s + torch.randn(7, V, generator=g)
    batch = LossInputs(
        target=torch.tensor([1, 2, 3, 0, 5, 4, 0]),
        loss_mask=torch.tensor([1, 1, 1, 1, 1, 1, 0]),  # last token is padding
        advantages=torch.tensor([0.8, 0.8, 0.8, -0.8, -0.8, 0.0, 0.0]),
        old_log_probs=torch.tensor([-1.5, -2.0, -1.0, -2.5, -1.2, -3.0, 0.0]),
        seq_index=torch.tensor([0, 0, 0, 1, 1, 2, 2]),
        ref_log_probs=torch.tensor([-1.6, -1.9, -1.1, -2.4, -1.0, -2.5, 0.0]),
        rollout_log_probs=torch.tensor([-1.55, -2.1, -1.0, -2.45, -1.3, -2.9, 0.0]),
    )
    return s, t, batch


def _dense_sdpg(s, t, b, beta, alpha, eps_low, eps_high, c, clamp, rho_cap=math.inf):
    ls, lt = s.log_softmax(-1), t.double().log_softmax(-1)
    logp = ls.gather(1, b.target[:, None]).squeeze(1)
    kl = (ls.exp() * (ls - lt)).sum(-1).clamp(max=clamp)
    adv, old = b.advantages.double(), b.old_log_probs.double()
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * c), pg)
    rho = torch.exp(logp.detach() - b.rollout_log_probs.double()).clamp(max=rho_cap)
    gate = (adv > 0).double()
    urkl = 0.5 * (logp - b.ref_log_probs.double()) ** 2
    per_token = pg + beta * rho * gate * kl + alpha * rho * urkl
    mask = b.loss_mask.double()
    return per_token, mask, kl


def test_sdpg_loss_token_mean_matches_dense_formula_and_gradient():
    s, t, b = _batch()
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=0.1, clip_eps_high=0.28, dual_clip_c=3.0)
    step = 100
    beta = 0.5 * min(1, 100 / 50) * min(1, (400 - 100) / 350)
    x = s.clone().requires_grad_(True)
    loss_sum, n, metrics = sdpg_loss(x, t, b, cfg, step)
    (loss_sum / n).backward()

    xd = s.double().requires_grad_(True)
    per_token, mask, kl = _dense_sdpg(xd, t, b, beta, 0.1, 0.2, 0.28, 3.0, 20.0)
    expected = (per_token * mask).sum()
    (expected / mask.sum()).backward()
    assert n.item() == 6
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    m = reduce_metrics([metrics])
    assert m["beta"] == pytest.approx(beta)
    assert m["distill_kl"] == pytest.approx((kl * mask).sum().item() / 6, rel=1e-5)
    assert m["distill_gated_frac"] == pytest.approx(3 / 6)
    diff = (xd.detach().log_softmax(-1).gather(1, b.target[:, None]).squeeze(1) - b.rollout_log_probs.double()).abs()
    assert m["rollout_logp_abs_diff_max"] == pytest.approx(diff[:6].max().item(), rel=1e-5)
    assert m["loss"] == pytest.approx(expected.item() / 6, rel=1e-5)


def test_without_the_policy_gradient_term_the_loss_is_distillation_plus_reference_kl_only():
    """``policy_gradient_term=False``: the dense formula less its PPO-clip term, values and gradient."""
    s, t, b = _batch()
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=0.1, beta_warmup_steps=0, beta_decay_steps=0,
                       distill_gate=False, policy_gradient_term=False)
    x = s.clone().requires_grad_(True)
    loss_sum, n, metrics = sdpg_loss(x, t, b, cfg, step=100)
    (loss_sum / n).backward()
    xd = s.double().requires_grad_(True)
    ls, lt = xd.log_softmax(-1), t.double().log_softmax(-1)
    logp = ls.gather(1, b.target[:, None]).squeeze(1)
    kl = (ls.exp() * (ls - lt)).sum(-1).clamp(max=20.0)
    rho = torch.exp(logp.detach() - b.rollout_log_probs.double())
    urkl = 0.5 * (logp - b.ref_log_probs.double()) ** 2
    per_token = (0.5 * rho * kl + 0.1 * rho * urkl) * b.loss_mask.double()
    expected = per_token.sum()
    (expected / 6).backward()
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)
    assert "policy_loss" not in metrics and "distill_kl" in metrics


def test_sg_rho_cap_bounds_the_factor_and_reports_the_largest_rho_and_the_capped_fraction():
    """A few tokens the engine found far less likely than the trainer (rho up to e^6) are capped at 2."""
    s, t, b = _batch()
    logp = s.double().log_softmax(-1).gather(1, b.target[:, None]).squeeze(1)
    b.rollout_log_probs = (logp - torch.tensor([6.0, 0.1, -0.2, 1.5, 0.0, 0.3, 9.0], dtype=torch.float64)).float()
    rho = torch.exp(logp - b.rollout_log_probs.double())  # token 6 (padding, rho e^9) does not count
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=0.1, sg_rho_cap=2.0)
    beta = 0.5 * min(1, 100 / 50) * min(1, 300 / 350)
    x = s.clone().requires_grad_(True)
    loss_sum, n, metrics = sdpg_loss(x, t, b, cfg, step=100)
    (loss_sum / n).backward()
    xd = s.double().requires_grad_(True)
    per_token, mask, _ = _dense_sdpg(xd, t, b, beta, 0.1, 0.2, 0.2, math.inf, 20.0, rho_cap=2.0)
    expected = (per_token * mask).sum()
    (expected / mask.sum()).backward()
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    m = reduce_metrics([metrics])
    assert m["sg_rho_max"] == pytest.approx(rho[:6].max().item(), rel=1e-5)  # before the cap: e^6
    assert m["sg_rho_capped_frac"] == pytest.approx(2 / 6)  # e^6 and e^1.5
    # Without the cap (the paper) the same batch gives a different loss, and nothing is capped.
    paper = sdpg_loss(s, t, b, apply_preset("sdpg", beta_base=0.5, alpha=0.1), step=100)
    uncapped = (_dense_sdpg(s.double(), t, b, beta, 0.1, 0.2, 0.2, math.inf, 20.0)[0] * mask).sum()
    assert paper[0].item() == pytest.approx(uncapped.item(), rel=1e-5)
    assert abs(uncapped.item() - expected.item()) > 1e-2
    assert reduce_metrics([paper[2]])["sg_rho_capped_frac"] == 0.0
    with pytest.raises(ConfigError, match=r"^algorithm\.sg_rho_cap: must be >= 1"):
        apply_preset("sdpg", sg_rho_cap=0.5)


@pytest.mark.parametrize("scaling", ["both", "student_only"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_teacher_temperature_scaling(scaling, divergence):
    """At T = 0.7: ``both`` divides both logits by T, ``student_only`` (the authors' code) only the student's.

    The reverse KL goes through the fused op, the forward KL through the JSD op.
    """
    s, t, b = _batch()
    temp = 0.7
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=0.0, beta_warmup_steps=0, beta_decay_steps=0, distill_gate=False,
                       distill_kl_clamp=None, sg_rho_factors=False, temperature=temp,
                       distill_divergence=divergence, teacher_temperature_scaling=scaling)
    x = s.clone().requires_grad_(True)
    loss_sum, n, _ = sdpg_loss(x, t, b, cfg, step=1)
    loss_sum.backward()
    xd = s.double().requires_grad_(True)
    ls = (xd / temp).log_softmax(-1)
    lt = (t.double() / (temp if scaling == "both" else 1.0)).log_softmax(-1)
    logp = ls.gather(1, b.target[:, None]).squeeze(1)
    ratio = torch.exp(logp - b.old_log_probs.double())
    adv = b.advantages.double()
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    div = (ls.exp() * (ls - lt)).sum(-1) if divergence == "reverse_kl" else (lt.exp() * (lt - ls)).sum(-1)
    expected = ((pg + 0.5 * div) * b.loss_mask.double()).sum()
    expected.backward()
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)


def test_one_step_stale_rollout_is_corrected_by_tis_and_sg_rho_against_the_current_policy():
    """rollout.off_policy_steps=1 with one update per batch: pi_old is the trainer's current policy
    (``old_log_probs=None``: its own detached log-probs), the rollout log-probs are the stale engine's.
    The PPO ratio is then 1, and the staleness enters through the truncated IS weight
    ``min(pi/pi_rollout, cap)`` on the policy gradient and SG[rho] on the KL terms (float64 by hand)."""
    s, t, b = _batch()
    logp = s.double().log_softmax(-1).gather(1, b.target[:, None]).squeeze(1)
    # The engine's (one step older) log-probs: off by up to 1.2 nats, one token beyond the cap e^0.9 > 2.
    b.rollout_log_probs = (logp - torch.tensor([0.3, -0.4, 0.9, 0.05, -1.2, 0.2, 0.0], dtype=torch.float64)).float()
    b.old_log_probs = None
    beta, alpha, cap = 0.5 * min(1, 100 / 50) * min(1, 300 / 350), 0.1, 2.0
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=alpha, tis_cap=cap)
    x = s.clone().requires_grad_(True)
    loss_sum, n, metrics = sdpg_loss(x, t, b, cfg, step=100)
    (loss_sum / n).backward()

    xd = s.double().requires_grad_(True)
    ls, lt = xd.log_softmax(-1), t.double().log_softmax(-1)
    lp = ls.gather(1, b.target[:, None]).squeeze(1)
    adv, mask = b.advantages.double(), b.loss_mask.double()
    ratio = torch.exp(lp - lp.detach())  # pi / pi_old with pi_old = the current policy: 1, gradient of pi
    w = torch.exp(lp.detach() - b.rollout_log_probs.double())  # pi_old / pi_rollout
    pg = -adv * ratio * w.clamp(max=cap)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    urkl = 0.5 * (lp - b.ref_log_probs.double()) ** 2
    per_token = pg + beta * w * (adv > 0).double() * kl + alpha * w * urkl
    expected = (per_token * mask).sum()
    (expected / mask.sum()).backward()
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    m = reduce_metrics([metrics])
    assert m["tis_weight"] == pytest.approx((w.clamp(max=cap) * mask).sum().item() / 6, rel=1e-5)
    assert m["tis_capped_frac"] == pytest.approx(1 / 6)  # e^0.9 only (token 6 is padding)
    assert m["sg_rho"] == pytest.approx((w * mask).sum().item() / 6, rel=1e-5)
    assert m["rollout_logp_abs_diff"] == pytest.approx(3.05 / 6, rel=1e-4)
    assert m["clip_frac"] == 0.0  # the ratio is 1: the staleness is not clipped away
    # The weight matters: without TIS (on-policy) the same stale batch gives another loss.
    plain = sdpg_loss(s, t, b, apply_preset("sdpg", beta_base=0.5, alpha=alpha), step=100)
    assert abs(plain[0].item() - expected.item()) > 1e-3 and "tis_weight" not in plain[2]


def test_explicit_per_sequence_gate_replaces_the_advantage_gate():
    s, t, b = _batch()
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=0.0)
    derived = sdpg_loss(s, t, b, cfg, step=100)[0]
    b.gate = torch.tensor([True, False, False])  # the same as advantages > 0
    assert sdpg_loss(s, t, b, cfg, step=100)[0].item() == pytest.approx(derived.item(), rel=1e-6)
    b.gate = torch.tensor([False, True, True])  # sequences 1 and 2 instead of 0
    _, _, metrics = sdpg_loss(s, t, b, cfg, step=100)
    assert reduce_metrics([metrics])["distill_gated_frac"] == pytest.approx(3 / 6)
    kl = _dense_sdpg(s.double(), t, b, 0.0, 0.0, 0.2, 0.2, math.inf, 20.0)[2]
    logp = s.double().log_softmax(-1).gather(1, b.target[:, None]).squeeze(1)
    rho = torch.exp(logp - b.rollout_log_probs.double())  # SG[rho] factor (appendix A.3)
    policy_only = apply_preset("sdpg", beta_base=0.0, alpha=0.0)
    distill = 0.5 * 6 / 7 * (rho * kl)[3:6].sum().item()
    expected = sdpg_loss(s, None, b, policy_only, step=100)[0].item() + distill
    assert sdpg_loss(s, t, b, cfg, step=100)[0].item() == pytest.approx(expected, rel=1e-5)


def test_after_first_divergence_marks_tokens_after_each_sequences_first_wrong_token():
    from megatron_sdpg.algo.losses import after_first_divergence

    divergent = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    seq_index = torch.tensor([0, 0, 0, 0, 1, 2, 1, 2, 2, 1])  # sequences interleaved, each in order
    # seq 0: tokens 0..3, first wrong at 1 -> 2, 3 after; seq 1: tokens 4, 6, 9, wrong at 6 -> 9 after;
    # seq 2: tokens 5, 7, 8, wrong at 8 -> nothing after.
    expected = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert torch.equal(after_first_divergence(divergent, seq_index, 3), expected)
    assert after_first_divergence(divergent[:0], seq_index[:0], 0).numel() == 0


def test_distill_mask_after_divergence_drops_the_kl_after_the_first_non_greedy_token():
    s, t, b = _batch()
    greedy = t.argmax(-1)
    b.target = torch.tensor([greedy[0], 3 if greedy[1] != 3 else 2, greedy[2], 0, 5, 4, 0])
    b.target[3] = greedy[3]
    b.target[4] = (greedy[4] + 1) % V
    b.target[5] = greedy[5]
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=0.0, distill_gate=False, distill_kl_clamp=None,
                       beta_warmup_steps=0, beta_decay_steps=0, distill_mask_after_divergence=True)
    loss, n, metrics = sdpg_loss(s, t, b, cfg, step=1)
    # seq 0 (tokens 0-2): wrong at 1 -> token 2 masked; seq 1 (3-4): wrong at 4, nothing after; seq 2: greedy.
    kept = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.float64)
    kl = _dense_sdpg(s.double(), t, b, 0.0, 0.0, 0.2, 0.2, math.inf, math.inf)[2]
    logp = s.double().log_softmax(-1).gather(1, b.target[:, None]).squeeze(1)
    rho = torch.exp(logp - b.rollout_log_probs.double())
    policy_only = apply_preset("sdpg", beta_base=0.0, alpha=0.0)
    expected = sdpg_loss(s, None, b, policy_only, step=1)[0].item() + 0.5 * (rho * kl * kept).sum().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert reduce_metrics([metrics])["distill_masked_frac"] == pytest.approx(1 / 6)


def test_seq_mean_token_mean_and_constant_normalisers():
    s, t, b = _batch()
    xd = s.double()
    beta = 1e-3 * min(1, 10 / 50)
    per_token, mask, _ = _dense_sdpg(xd, t, b, beta, 1e-3, 0.2, 0.2, math.inf, 20.0)
    per_token = per_token * mask
    seq_means = [per_token[0:3].sum() / 3, per_token[3:5].sum() / 2, per_token[5:6].sum() / 1]
    cfg = apply_preset("sdpg", loss_agg="seq-mean-token-mean")
    loss_sum, n, _ = sdpg_loss(s, t, b, cfg, step=10)
    assert n.item() == 3
    assert loss_sum.item() == pytest.approx(sum(seq_means).item(), rel=1e-5)
    cfg = apply_preset("sdpg", loss_agg="constant", loss_agg_constant=16)
    loss_sum, n, _ = sdpg_loss(s, t, b, cfg, step=10)
    assert n.item() == 3 and loss_sum.item() == pytest.approx(per_token.sum().item() / 16, rel=1e-5)


def test_opsd_loss_is_masked_mean_jsd():
    s, t, b = _batch()
    ls, lt = s.double().log_softmax(-1), t.double().log_softmax(-1)
    m = torch.log(0.5 * ls.exp() + 0.5 * lt.exp())
    jsd = 0.5 * (lt.exp() * (lt - m)).sum(-1) + 0.5 * (ls.exp() * (ls - m)).sum(-1)
    loss_sum, n, metrics = sdpg_loss(s, t, b, apply_preset("opsd"), step=1)
    assert n.item() == 6
    assert loss_sum.item() == pytest.approx(jsd[:6].sum().item(), rel=1e-5)
    assert "policy_loss" not in metrics


def test_grpo_loss_is_the_clipped_surrogate_plus_k3_by_hand():
    """GRPO preset: beta 0, k3 reference KL in the loss with alpha 1e-3, no SG[rho] factors, token mean.

    Written out token by token: ``max(-A r, -A clip(r, 0.8, 1.2)) + alpha (pi_ref/pi - 1 - log(pi_ref/pi))``.
    """
    s, t, b = _batch()
    b.rollout_log_probs = b.rollout_log_probs - 2.0  # rho = e^2 would change the loss if it were applied
    x = s.clone().requires_grad_(True)
    loss_sum, n, metrics = sdpg_loss(x, None, b, apply_preset("grpo"), step=5)
    (loss_sum / n).backward()
    xd = s.double().requires_grad_(True)
    logp = xd.log_softmax(-1).gather(1, b.target[:, None]).squeeze(1)
    expected = []
    for i in range(6):  # token 6 is padding
        a, r = b.advantages[i].item(), torch.exp(logp[i] - b.old_log_probs[i].item())
        pg = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
        log_ratio = b.ref_log_probs[i].item() - logp[i]
        expected.append(pg + 1e-3 * (torch.exp(log_ratio) - 1 - log_ratio))
    expected = torch.stack(expected).sum()
    (expected / 6).backward()
    assert n.item() == 6
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)
    assert "distill_kl" not in metrics and "sg_rho_max" not in metrics


def test_grpo_runs_without_teacher_and_sdpg_requires_one():
    s, t, b = _batch()
    loss_sum, n, metrics = sdpg_loss(s, None, b, apply_preset("grpo"), step=5)
    assert torch.isfinite(loss_sum) and "distill_kl" not in metrics
    with pytest.raises(ValueError, match="teacher_logits is None"):
        sdpg_loss(s, None, b, apply_preset("sdpg"), step=5)
    b.ref_log_probs = None
    with pytest.raises(ValueError, match="ref_log_probs is None"):
        sdpg_loss(s, None, b, apply_preset("grpo"), step=5)


def test_empty_micro_batch():
    b = LossInputs(*(torch.zeros(0, dtype=torch.long) for _ in range(2)), torch.zeros(0), torch.zeros(0),
                   torch.zeros(0, dtype=torch.long), ref_log_probs=torch.zeros(0), rollout_log_probs=torch.zeros(0))
    x = torch.zeros(0, V, requires_grad=True)
    loss_sum, n, metrics = sdpg_loss(x, torch.zeros(0, V), b, apply_preset("sdpg"), step=100)
    assert loss_sum.item() == 0.0 and n.item() == 0.0
    loss_sum.backward()
    assert x.grad.shape == (0, V)
    assert reduce_metrics([metrics])["entropy"] == 0.0


def test_presets_and_validation():
    assert apply_preset("sdpg") == AlgorithmConfig()
    authors = apply_preset("sdpg-authors")
    assert (authors.clip_eps_high, authors.dual_clip_c, authors.beta_warmup_steps, authors.beta_decay_steps,
            authors.distill_gate, authors.ref_kl_mode, authors.reward_scheme, authors.sg_rho_factors) == (
        0.28, 10.0, 0, 0, False, "urkl", "plus_minus_one", False)
    assert apply_preset("grpo").beta_base == 0.0 and apply_preset("opsd").objective == "opsd"
    for name in PRESETS:
        apply_preset(name).validate("algorithm")
    with pytest.raises(ConfigError, match=r"^algorithm\.preset: unknown preset 'ppo'"):
        apply_preset("ppo")
    with pytest.raises(ConfigError, match=r"^algorithm\.dual_clip_c: must be > 1"):
        apply_preset("sdpg", dual_clip_c=0.5)
    with pytest.raises(ConfigError, match=r"^algorithm\.loss_agg_constant"):
        apply_preset("sdpg", loss_agg="constant")
    with pytest.raises(ConfigError, match=r"^rl\.ref_kl_mode: 'kl' is not one of"):
        AlgorithmConfig(ref_kl_mode="kl").validate("rl")
    with pytest.raises(ConfigError, match=r"^algorithm\.teacher_temperature_scaling: 'teacher' is not one of"):
        apply_preset("sdpg", teacher_temperature_scaling="teacher")
    with pytest.raises(ConfigError, match=r"^algorithm\.bogus: no such field"):
        apply_preset("sdpg", bogus=1)


def test_inplace_backward_loss_gives_the_same_gradient_through_an_index_select_copy():
    s, t, b = _batch()
    cfg = apply_preset("sdpg", beta_base=0.5, alpha=0.1)
    grads = []
    for inplace in (False, True):
        full = torch.cat([torch.zeros(2, V), s]).requires_grad_(True)  # rows 2.. hold the response logits
        student = full.index_select(0, torch.arange(2, 2 + s.shape[0]))  # private copy, as in the trainer
        loss_sum, n, _ = sdpg_loss(student, t, b, cfg, step=60, inplace_backward=inplace)
        (loss_sum / n).backward()
        grads.append(full.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
