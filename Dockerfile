# megatron_sdpg on NVIDIA's PyTorch container (torch, transformer-engine, apex, NCCL inside).
#
#   docker build -t megatron-sdpg .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3 -t megatron-sdpg .
#
# Two Python environments in one image:
#   * the container's own Python (/usr/bin/python): the trainer, with NVIDIA's torch build,
#     transformer-engine and apex, plus megatron-core and this project (pip install -e .,
#     which also builds the project's pybind11 extension when setup.py declares one);
#   * /opt/sglang (a venv): the SGLang engines and sglang-router. SGLang pins its own torch,
#     which must not replace the container's (transformer-engine is built against it).
# The launch scripts use /opt/sglang/bin/python for engines when CONTAINER_IMAGE is set
# (ENGINE_PYTHON overrides it). Not built or run on the development machines: see docs/docker.md.

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.16.1
ARG SGLANG_VERSION=0.5.23
ARG SGLANG_ROUTER_VERSION=0.3.2

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# The rollout engines: their own venv, so SGLang's torch pin stays out of the trainer's environment.
RUN python -m venv /opt/sglang \
    && /opt/sglang/bin/pip install "sglang[all]==${SGLANG_VERSION}" "sglang-router==${SGLANG_ROUTER_VERSION}" \
    && /opt/sglang/bin/python -c "import sglang, sglang_router; print('sglang', sglang.__version__)"

# The trainer's dependencies first (cached across source changes). NGC images constrain torch
# through PIP_CONSTRAINT (/etc/pip/constraint.txt), so pip keeps NVIDIA's build.
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" "pybind11>=2.12" "omegaconf>=2.3,<3" \
        "transformers>=4.56,<6" "safetensors>=0.4" "aiohttp>=3.9,<4" "psutil>=5.9" "einops>=0.7" "tqdm>=4.66" \
    && python -c "import megatron.core, transformer_engine, apex; print('megatron-core', megatron.core.__version__)"

WORKDIR /workspace/megatron_sdpg
COPY . .

# Editable install; --no-build-isolation builds any pybind11/torch extension against the container's
# torch and pybind11 instead of a freshly downloaded pair.
RUN pip install --no-build-isolation -e ".[dev]" \
    && python -c "import megatron_sdpg.plan, megatron_sdpg.train; print('megatron_sdpg ok')"

CMD ["bash"]
