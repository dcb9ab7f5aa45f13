#!/usr/bin/env bash
# Installs the CPU environment and runs the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# bench: TRL for tests/e2e/test_bench_vs_trl.py (its deps are already here: no torch/transformers change).
python3 -m pip install -q -r requirements/cpu.txt -e '.[dev,bench]'
# SGLang's own package for the contract tests (tests/contract/), without its GPU dependencies:
# --no-deps keeps sglang's CUDA torch, flashinfer, ... out of this environment.
python3 -m pip install -q --no-deps -r requirements/contract.txt
exec python3 -m pytest -q -p no:cacheprovider "$@"
