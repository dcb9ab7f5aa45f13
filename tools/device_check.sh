#!/usr/bin/env bash
# GPU checks of the foundation and vocab-parallel issues, as one script for a lent CUDA machine:
#   NCCL layout check vs CPU, a bf16 ~100M-parameter step, the ops vs float64 on GPU,
#   and the full-vocabulary KL benchmark in bf16 at T=16384, V=151,936 (naive dense, the chunked
#   PyTorch path, and the one-pass Triton kernels as project_triton / time_ratio_triton).
# Wheels missing on the machine (megatron-core for its Python) travel in .whl/ (see docs).
# Results go to $OUT (default /tmp/device_check).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, megatron.core, transformers; print(sys.version.split()[0], torch.__version__, megatron.core.__version__, transformers.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "triton missing: no project_triton case"
} 2>&1 | tee "$OUT/machine.txt"
timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
timeout 270 python3 benchmarks/bench_vocab_parallel_kl.py --device cuda --dtype bf16 --tokens 16384 --tp 1 \
  --mem-budget-gb 100 2>&1 | tee "$OUT/bench_vocab_parallel_kl.jsonl" | tail -8
