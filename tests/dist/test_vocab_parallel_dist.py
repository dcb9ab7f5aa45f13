"""Every vocab-parallel op, and sdpg_loss, on 1, 2 and 4 gloo ranks against float64 references.

The cases include the temperature grid (T in {0.6, 0.7, 1.0, 1.3}, fp32 and bf16),
compared with float64 directly at every TP size.

Each rank slices its shard of the same seeded full logits, runs all ops on all
cases in one spawn, and returns values and gradient shards; the parent
reassembles them and compares with the float64 dense reference (tolerances in
tests/vocab_reference.py). The same spawn runs ``sdpg_loss`` on its shard; its
loss and reassembled gradient must match the single-process (tp_group=None)
result to 1e-5 relative, and a float64 dense computation of the whole objective
(``_dense_objective``, written from the formulas here: log-softmax over the full
vocabulary, PPO clip, dual clip, SG[rho], gate, divergence mask, reference KL,
aggregation) to 1e-5 relative (fp32 logits) or the bf16 gradient tolerance.
"""

import io

import pytest
import torch
import torch.distributed as dist

from megatron_sdpg.algo.config import apply_preset
from megatron_sdpg.algo.losses import LossInputs, reduce_metrics, sdpg_loss
from megatron_sdpg.testing.distributed import run_on_ranks
from tests import vocab_reference as ref

LOSS_VOCAB = 16


def _loss_case():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(9, LOSS_VOCAB, generator=g) * 2
    t = s + torch.randn(9, LOSS_VOCAB, generator=g)
    batch = LossInputs(
        target=torch.randint(0, LOSS_VOCAB, (9,), generator=g),
        loss_mask=torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 0]),
        advantages=torch.tensor([1.0] * 4 + [-1.0] * 3 + [0.0] * 2),
        old_log_probs=-torch.rand(9, generator=g) * 3,
        seq_index=torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2]),
        ref_log_probs=-torch.rand(9, generator=g) * 3,
        rollout_log_probs=-torch.rand(9, generator=g) * 3,
    )
    greedy = t.argmax(-1)  # some tokens on the teacher's greedy path, for the divergence mask
    batch.target[[0, 1, 5, 7]] = greedy[[0, 1, 5, 7]]
    cfgs = [apply_preset("sdpg", beta_base=0.3, alpha=0.05), apply_preset("opsd"),
            apply_preset("sdpg-authors", beta_base=0.2, loss_agg="seq-mean-token-mean", vocab_chunk_size=4),
            apply_preset("sdpg", beta_base=0.3, alpha=0.0, distill_gate=False, distill_mask_after_divergence=True),
            # bf16 logits at the sampling temperature 0.7, the rho factor capped.
            apply_preset("sdpg", beta_base=0.3, alpha=0.05, temperature=0.7, sg_rho_cap=1.5, vocab_chunk_size=4),
            apply_preset("sdpg", beta_base=0.3, alpha=0.05, temperature=0.7,
                         teacher_temperature_scaling="student_only")]
    return s, t, batch, cfgs


BF16_CFGS = (4,)  # indices of the configs run on bf16 logits


def _logits_for(j, x):
    """The logits config ``j`` runs on: bf16-rounded for ``BF16_CFGS``."""
    return x.to(torch.bfloat16) if j in BF16_CFGS else x


def _dense_objective(s, t, b, cfg, step):
    """``loss_sum / normaliser`` of ``sdpg_loss`` in float64 from the formulas (full vocabulary).

    Covers what ``_loss_case`` uses: policy_gradient and opsd, reverse KL and JSD(0.5),
    the beta windows, gate, divergence mask, SG[rho] (with cap), dual clip, URKL,
    token-mean and seq-mean-token-mean.
    """
    temp = cfg.temperature if cfg.temperature is not None else 1.0
    t_temp = temp if cfg.teacher_temperature_scaling == "both" else 1.0
    ls, lt = (s / temp).log_softmax(-1), (t.double() / t_temp).log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    mask = b.loss_mask.bool()
    logp = ls.gather(1, b.target[:, None]).squeeze(1)
    warm = min(1.0, step / cfg.beta_warmup_steps) if cfg.beta_warmup_steps else 1.0
    decay = min(1.0, ((cfg.total_steps or 400) - step) / cfg.beta_decay_steps) if cfg.beta_decay_steps else 1.0
    beta = cfg.beta_base * warm * decay
    opsd = cfg.objective == "opsd"
    if opsd:
        lm = torch.log(0.5 * ps + 0.5 * pt)
        div = 0.5 * (pt * (lt - lm)).sum(-1) + 0.5 * (ps * (ls - lm)).sum(-1)
        per_token = beta * div
    else:
        adv, old = b.advantages.double(), b.old_log_probs.double()
        ratio = torch.exp(logp - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high))
        if cfg.dual_clip_c is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip_c), pg)
        rho = torch.ones_like(logp)
        if cfg.sg_rho_factors:
            rho = torch.exp(logp.detach() - b.rollout_log_probs.double())
            if cfg.sg_rho_cap is not None:
                rho = rho.clamp(max=cfg.sg_rho_cap)
        div = (ps * (ls - lt)).sum(-1).clamp(max=cfg.distill_kl_clamp)
        gate = mask & (adv > 0) if cfg.distill_gate else mask.clone()
        if cfg.distill_mask_after_divergence:
            wrong = t.double().gather(1, b.target[:, None]).squeeze(1) < t.double().amax(-1)
            for seq in b.seq_index.unique():
                idx = [i for i in range(len(mask)) if b.seq_index[i] == seq and mask[i]]
                first = next((k for k, i in enumerate(idx) if wrong[i]), None)
                if first is not None:
                    gate[idx[first + 1:]] = False
        urkl = 0.5 * (logp - b.ref_log_probs.double()) ** 2
        per_token = pg + beta * rho * gate * div + cfg.alpha * rho * urkl
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if cfg.loss_agg == "token-mean":
        return per_token.sum() / mask.sum()
    assert cfg.loss_agg == "seq-mean-token-mean"
    means = [per_token[b.seq_index == q].sum() / mask[b.seq_index == q].sum()
             for q in b.seq_index.unique() if mask[b.seq_index == q].any()]
    return torch.stack(means).sum() / len(means)


def _sdpg_loss_on_shard(rank, world_size, group):
    s, t, batch, cfgs = _loss_case()
    per = LOSS_VOCAB // world_size
    sl = slice(rank * per, (rank + 1) * per)
    out = []
    for j, cfg in enumerate(cfgs):
        x = _logits_for(j, s[:, sl]).clone().requires_grad_(True)
        loss_sum, n, metrics = sdpg_loss(x, _logits_for(j, t[:, sl]), batch, cfg, step=60, tp_group=group)
        (loss_sum / n).backward()
        out.append((loss_sum.detach(), n, reduce_metrics([metrics]), x.grad))
    return out


def _all_ops_all_cases(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    cases = ref.make_cases() + ref.temperature_grid()
    results = [ref.run_ops_on_shard(case, rank, world_size, group) for case in cases]
    losses = _sdpg_loss_on_shard(rank, world_size, group)
    buf = io.BytesIO()  # tensors as plain bytes: shared-memory handles die with the rank
    torch.save((results, losses), buf)
    return buf.getvalue()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_vocab_parallel_ops_and_loss_match_single_process(world_size):
    per_rank = [torch.load(io.BytesIO(b)) for b in run_on_ranks(_all_ops_all_cases, world_size, timeout=240)]
    for i, case in enumerate(ref.make_cases() + ref.temperature_grid()):
        ref.check_against_reference(case, [r[0][i] for r in per_rank])
    single = _sdpg_loss_on_shard(0, 1, None)
    for j, (loss_sum, n, metrics, grad) in enumerate(single):
        got = [r[1][j] for r in per_rank]
        torch.testing.assert_close(got[0][0], loss_sum, rtol=1e-5, atol=1e-7)
        assert got[0][1] == n
        if j == 3:  # seq 0 leaves the greedy path at token 2: token 3 is masked; seq 1 at token 6
            assert metrics["distill_masked_frac"] > 0
        for name, value in metrics.items():
            assert got[0][2][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        torch.testing.assert_close(torch.cat([g[3] for g in got], dim=-1), grad, rtol=1e-5, atol=1e-7)
    # Against float64: the whole objective and its gradient, on the (dtype-rounded) logits each config ran on.
    s, t, batch, cfgs = _loss_case()
    for j, cfg in enumerate(cfgs):
        x = _logits_for(j, s).double().requires_grad_(True)
        expected = _dense_objective(x, _logits_for(j, t).double(), batch, cfg, step=60)
        expected.backward()
        loss_sum, n = per_rank[0][1][j][:2]
        what = f"config {j} ({cfg.preset}) at TP {world_size}"
        assert (loss_sum.double() / n).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7), what
        grad = torch.cat([r[1][j][3] for r in per_rank], dim=-1).double()
        scale = x.grad.abs().max().item()
        tol = dict(rtol=8e-3, atol=4e-3 * scale) if j in BF16_CFGS else dict(rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(grad, x.grad, **tol, msg=lambda m: f"{what} grad vs float64: {m}")
