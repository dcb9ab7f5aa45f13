"""``ops.fused_output`` on 2 and 4 gloo ranks against the float64 dense reference.

Each rank takes its shard of the padded output weight (56 rows, 50 real ids:
at TP 4 the last shard is partly padding), runs the op on every case in one
spawn and returns values, the student hidden states' gradient (all-reduced over
TP inside the op) and its weight shard's gradient. The parent checks that
every rank's values and hidden-state gradient equal the reference and that the
weight shards, concatenated, equal the reference weight gradient.
"""

import io

import pytest
import torch
import torch.distributed as dist

from megatron_sdpg.testing.distributed import run_on_ranks
from tests import fused_output_reference as R


def _cases():
    return [
        R.make_case(f"{div}_T{t}_{str(dt)[6:]}", t, dt, div)
        for dt in (torch.float32, torch.bfloat16)
        for t in (0.7, 1.0)
        for div in ("reverse_kl", "jsd")
    ]


EAGER = ("exact", "scaled", "wrong")


def _gated():
    """Tokens 0-9 without divergence gradient, 5-9 without any: backward skips work per chunk of 5."""
    case = R.make_case("gated", 0.7, torch.float32)
    case["w_div"][:10] = 0.0
    case["w_lp"][5:10] = 0.0
    return case


def _all_cases(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    results = [R.run_on_shard(case, rank, world_size, group) for case in _cases()]
    results.append(R.run_on_shard(_cases()[0], rank, world_size, group, own_teacher_weight=True))
    results.append(R.run_on_shard(_gated(), rank, world_size, group))
    for eager in EAGER:  # the first case, gradients taken in the forward (or recomputed on the fallback)
        results.append(R.run_on_shard(_cases()[0], rank, world_size, group, eager=eager))
    buf = io.BytesIO()
    torch.save(results, buf)
    return buf.getvalue()


@pytest.mark.parametrize("world_size", [2, 4])
def test_fused_output_matches_float64_dense_across_tp(world_size):
    per_rank = [torch.load(io.BytesIO(b)) for b in run_on_ranks(_all_cases, world_size, timeout=240)]
    per = R.PADDED // world_size
    cases = _cases()
    refs = [R.reference(c) for c in cases] + [R.reference(cases[0], own_teacher_weight=True), R.reference(_gated())]
    refs += [refs[0]] * len(EAGER)
    for i, (case, ref) in enumerate(zip(cases + [cases[0], _gated()] + [cases[0]] * len(EAGER), refs)):
        for rank, results in enumerate(per_rank):
            got = dict(results[i])
            R.assert_matches(got, ref, case["dtype"], f"{case['name']} rank {rank}/{world_size}",
                             grad_w_rows=slice(rank * per, (rank + 1) * per))
        full = torch.cat([r[i]["grad_w"] for r in per_rank])
        assert full[R.VOCAB:].abs().max().item() == 0.0
