# megatron_sdpg: trainer, SGLang engines and router in ONE Python environment with ONE torch and NCCL.
#
#   docker build -t megatron-sdpg .
#   docker build --build-arg SGLANG_IMAGE=lmsysorg/sglang:v0.5.23-cu130 -t megatron-sdpg .
#
# Why one environment: the distributed weight sync joins the trainer and every engine rank to one
# NCCL communicator, which NCCL refuses when the ranks run different NCCL versions ("Mismatched
# NCCL version"), and the colocated tensor sync hands CUDA-IPC handles from the trainer's torch
# to the engines' torch. So the image starts from SGLang's release image (CUDA devel toolkit,
# Python 3.12, sglang and sglang-router with the torch, triton, NCCL and FlashInfer SGLang was
# built and tested with) and adds transformer-engine (compiled here against that torch),
# megatron-core and this project.
#
# Nothing may replace what the base brings: every later pip call runs under a constraint file
# written from the base's own installed versions (PIP_CONSTRAINT), so a requirement that would
# move torch, triton, NCCL, transformers or anything else SGLang relies on fails the build rather
# than silently swapping it. That is also why the project is installed without its [dev] extra
# (its triton pin is for the CPU test machines). Not built on the development machines: see
# docs/docker.md for what was verified and what was not.

ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23-cu130
FROM ${SGLANG_IMAGE}

ARG SGLANG_VERSION=0.5.23
ARG SGLANG_ROUTER_VERSION=0.3.2
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMER_ENGINE_VERSION=2.20.2
ARG MAX_JOBS=16

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# The base is the SGLang release we test against (requirements/contract.txt); the router is added
# at its pinned version when the image lacks it. Then every installed version becomes a constraint.
RUN python3 -c "import sglang, torch; assert sglang.__version__ == '${SGLANG_VERSION}', sglang.__version__; print('sglang', sglang.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && { python3 -c "import sglang_router" 2>/dev/null || python3 -m pip install "sglang-router==${SGLANG_ROUTER_VERSION}"; } \
    && mkdir -p /etc/megatron-sdpg \
    && python3 -m pip list --format=freeze | grep -E '^[A-Za-z0-9_.-]+==' > /etc/megatron-sdpg/base-constraints.txt \
    && grep -E '^(torch|triton|sglang)==' /etc/megatron-sdpg/base-constraints.txt

ENV PIP_CONSTRAINT=/etc/megatron-sdpg/base-constraints.txt

# transformer-engine's PyTorch extension is compiled against the base's torch (no build isolation:
# an isolated build would download and compile against a different torch); the core library is
# the CUDA 13 wheel, matching the base's CUDA.
RUN python3 -m pip install "pybind11>=2.12,<4" "ninja>=1.11,<2" \
    && MAX_JOBS=${MAX_JOBS} NVTE_FRAMEWORK=pytorch python3 -m pip install --no-build-isolation \
        "transformer-engine[pytorch,core-cu13]==${TRANSFORMER_ENGINE_VERSION}" \
    && python3 -c "import transformer_engine.pytorch as te; print('transformer-engine', te.__version__)"

# The trainer's dependencies first (cached across source changes).
RUN python3 -m pip install "megatron-core==${MEGATRON_CORE_VERSION}" "omegaconf>=2.3,<3" "psutil>=5.9" \
        "einops>=0.7" "tqdm>=4.66" "pebble>=5.1,<6" "math-verify[antlr4-13-2]>=0.7,<1" "matplotlib>=3.7" \
        "pytest>=8" "pytest-timeout>=2.3" \
    && python3 -c "import megatron.core; print('megatron-core', megatron.core.__version__)"

WORKDIR /workspace/megatron_sdpg
COPY . .

# Editable install without extras; --no-build-isolation builds the pybind11 packing extension
# against the base's torch and pybind11.
RUN python3 -m pip install --no-build-isolation -e . \
    && python3 -c "import megatron_sdpg.plan, megatron_sdpg.train, sglang.srt.server_args, sglang_router.launch_router; print('megatron_sdpg ok')"

CMD ["bash"]
