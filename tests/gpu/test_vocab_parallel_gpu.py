"""The vocab-parallel ops on CUDA tensors against the float64 dense reference (skips without CUDA).

``full_vocab_kl`` and ``log_probs_kl_entropy`` run with both backends (the
chunked PyTorch path and the Triton kernels of ``vocab_parallel_triton``), on a
64-entry vocabulary and on half of a 151,936 vocabulary (a TP=2 shard: 19 blocks
of 4096, the last one partial); the other ops on the small vocabulary.
"""

import importlib.util

import pytest
import torch

from tests import vocab_reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAMES = [c["name"] for c in ref.make_cases(8)]


def _on_gpu(case):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _to_cpu(out):
    return {name: (v.cpu(), g.cpu()) for name, (v, g) in out.items()}


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_ops_on_cuda_match_float64_dense(index):
    case = ref.make_cases()[index]
    ref.check_against_reference(case, [_to_cpu(ref.run_ops_on_shard(_on_gpu(case), 0, 1, None))])


@pytest.mark.parametrize("vocab", [64, 151_936 // 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_kl_ops_on_cuda_match_float64_dense(index, backend, vocab):
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    case = ref.make_cases(vocab)[index]
    out = ref.run_kl_ops_on_shard(_on_gpu(case), 0, 1, None, backend)
    ref.check_against_reference(case, [_to_cpu(out)])
