"""Helpers for rollout tests and benchmarks: start a CPU server, reference log-probs.

The reference is an independent dense forward of a ``transformers`` model in
float64 over the whole sequence (no KV cache, no padding), against which the
server's fp32 cached, batched decoding is compared.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

from megatron_sdpg.rollout.launcher import EngineProcess, cpu_server_command
from megatron_sdpg.testing.distributed import free_port


def start_cpu_server(hf_dir: str, log_dir: str, seed: int = 0, threads: int = 1, timeout_s: float = 120.0,
                     **options: object) -> EngineProcess:
    """Starts ``python -m megatron_sdpg.rollout.server`` on a free loopback port and waits for /health.

    ``options`` are further server flags (``dtype="bfloat16"`` -> ``--dtype bfloat16``).
    """
    port = free_port()
    cmd = cpu_server_command(hf_dir, "127.0.0.1", port, {"seed": seed, "threads": threads, **options},
                             python=sys.executable)
    env = {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p),
           "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    engine = EngineProcess(cmd, f"http://127.0.0.1:{port}", os.path.join(log_dir, f"cpu_server_{port}.log"), env)
    engine.start()
    try:
        engine.wait_healthy(timeout_s)
    except BaseException:
        engine.stop(grace_s=2.0)
        raise
    return engine


@torch.no_grad()
def reference_logprobs(model, prompt: Sequence[int], output: Sequence[int], temperature: float = 1.0) -> tuple[list[float], list[float]]:
    """Float64 dense reference: ``(prompt_logprobs [p-1], output_logprobs [c])``.

    Prompt log-probs use the raw logits; output log-probs ``log_softmax(logits / temperature)``
    (SGLang's conventions).
    """
    ids = torch.tensor([list(prompt) + list(output)], dtype=torch.long)
    model64 = model.to(torch.float64)
    try:
        logits = model64(input_ids=ids).logits[0].to(torch.float64)
    finally:
        model.to(torch.float32)
    targets = ids[0, 1:]
    raw = torch.log_softmax(logits[:-1], dim=-1).gather(1, targets[:, None])[:, 0]
    scaled = torch.log_softmax(logits[:-1] / temperature, dim=-1).gather(1, targets[:, None])[:, 0]
    p = len(prompt)
    return raw[: p - 1].tolist(), scaled[p - 1 :].tolist()


def random_like_state(model, seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """New random weights with the model's names and shapes (fp32, 2-D normal, norms near 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if p.dim() == 2:
            out[name] = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
        else:
            out[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
    return out
