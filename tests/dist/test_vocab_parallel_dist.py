"""Every vocab-parallel op, and sdpg_loss, on 1, 2 and 4 gloo ranks against single-process references.

The cases include the temperature grid (T in {0.6, 0.7, 1.0, 1.3}, fp32 and bf16),
compared with float64 directly at every TP size.

Each rank slices its shard of the same seeded full logits, runs all ops on all
cases in one spawn, and returns values and gradient shards; the parent
reassembles them and compares with the float64 dense reference (tolerances in
tests/vocab_reference.py). The same spawn runs ``sdpg_loss`` on its shard; its
loss and reassembled gradient must match the single-process (tp_group=None)
result to 1e-5 relative.
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
            apply_preset("sdpg", beta_base=0.3, alpha=0.0, distill_gate=False, distill_mask_after_divergence=True)]
    return s, t, batch, cfgs


def _sdpg_loss_on_shard(rank, world_size, group):
    s, t, batch, cfgs = _loss_case()
    per = LOSS_VOCAB // world_size
    sl = slice(rank * per, (rank + 1) * per)
    out = []
    for cfg in cfgs:
        x = s[:, sl].clone().requires_grad_(True)
        loss_sum, n, metrics = sdpg_loss(x, t[:, sl], batch, cfg, step=60, tp_group=group)
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
