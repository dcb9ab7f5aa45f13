"""Every vocab-parallel op on 1, 2 and 4 gloo ranks against the float64 dense reference.

Each rank slices its shard of the same seeded full logits, runs all ops on all
cases in one spawn, and returns values and gradient shards; the parent
reassembles them and compares (tolerances in tests/vocab_reference.py).
"""

import io

import pytest
import torch
import torch.distributed as dist

from megatron_sdpg.testing.distributed import run_on_ranks
from tests import vocab_reference as ref


def _all_ops_all_cases(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    results = [ref.run_ops_on_shard(case, rank, world_size, group) for case in ref.make_cases()]
    buf = io.BytesIO()  # tensors as plain bytes: shared-memory handles die with the rank
    torch.save(results, buf)
    return buf.getvalue()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_vocab_parallel_ops_match_dense(world_size):
    per_rank = [torch.load(io.BytesIO(b)) for b in run_on_ranks(_all_ops_all_cases, world_size, timeout=240)]
    for i, case in enumerate(ref.make_cases()):
        ref.check_against_reference(case, [r[i] for r in per_rank])
