"""The vocab-parallel ops on CUDA tensors against the float64 dense reference (skips without CUDA)."""

import pytest
import torch

from tests import vocab_reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = ref.make_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ops_on_cuda_match_float64_dense(case):
    on_gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out = ref.run_ops_on_shard(on_gpu, 0, 1, None)
    out = {name: (v.cpu(), g.cpu()) for name, (v, g) in out.items()}
    ref.check_against_reference(case, [out])
