"""Helpers shared by the vocab-parallel ops: shard geometry, chunking, reductions.

Logits arrive sharded on the last dimension across ``tp_group``: rank ``r`` of
``tp`` holds the contiguous global vocabulary ids ``[r * V/tp, (r + 1) * V/tp)``.
Every helper here works on one rank's shard and, where it needs the whole
vocabulary, all-reduces only per-token statistics (``[k, chunk]`` fp32 tensors),
never the vocabulary itself. ``tp_group=None`` means no tensor parallelism: no
collective is issued at all.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Iterator

import torch
import torch.distributed as dist

GPU_CHUNK_TOKENS = 128
"""Default tokens per chunk on GPUs: few, large kernels (one fp32 buffer is 78 MB at 151,936)."""

CPU_CHUNK_BYTES = 3 << 20
"""Default fp32 bytes of one chunk buffer on CPUs: the few buffers a chunk needs stay in the
last-level cache, so the several passes over a chunk do not go to DRAM (at a 151,936-entry
shard: 5 tokens; measured 2x faster than 128 tokens on a 32 MiB-L3 CPU)."""

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "MEGATRON_SDPG_VOCAB_BACKEND"
"""Environment variable giving the default ``backend`` of the ops that have a Triton path."""


def shard_rank_and_size(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """Returns ``(rank, world_size)`` of ``tp_group``; ``(0, 1)`` for None."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce over ``tp_group``; a no-op without TP."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(t, op=op, group=tp_group)
    return t


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """Views ``[..., v/tp]`` as ``[n, v/tp]`` (copies only if it must)."""
    if logits.dim() < 1:
        raise ValueError(f"logits must have a vocab dimension, got shape {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raises ValueError unless the student and teacher logits have the same shape."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher.shape)} != student_logits shape {tuple(student.shape)}"
        )


def resolve_chunk_size(chunk_size: int | None, logits: torch.Tensor) -> int:
    """Checks ``chunk_size``, or picks the default for the logits' device when it is None.

    Returns:
        Tokens per chunk: ``chunk_size``; else ``GPU_CHUNK_TOKENS`` on an accelerator,
        or as many tokens as fit ``CPU_CHUNK_BYTES`` of fp32 on a CPU (at least 1).
    """
    if chunk_size is None:
        if logits.device.type != "cpu":
            return GPU_CHUNK_TOKENS
        return max(1, CPU_CHUNK_BYTES // (4 * max(1, logits.shape[-1] if logits.dim() else 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def resolve_teacher_temperature(teacher_temperature: float | None, temperature: float) -> float:
    """The teacher's temperature: ``temperature`` when None, else checked (> 0)."""
    if teacher_temperature is None:
        return float(temperature)
    if not teacher_temperature > 0:
        raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature!r}")
    return float(teacher_temperature)


def chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """Yields row slices of at most ``chunk_size`` covering ``[0, n)``."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(n, start + chunk_size))


def scaled_fp32(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of ``chunk / temperature`` that callers may modify in place."""
    z = chunk.to(torch.float32, copy=True)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def global_max(zs: list[torch.Tensor], tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Row maxima over the whole vocabulary, one all-reduce(MAX) for all inputs.

    Args:
        zs: ``k`` tensors ``[c, v/tp]`` (fp32).

    Returns:
        ``[k, c]`` fp32. A row that is ``-inf`` everywhere gets 0 so that
        ``z - max`` stays ``-inf`` instead of NaN.
    """
    m = torch.stack([z.amax(dim=-1) for z in zs])
    all_reduce_(m, dist.ReduceOp.MAX, tp_group)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def zero_where_nan_(x: torch.Tensor) -> torch.Tensor:
    """Replaces NaN with 0 in place, keeping +-inf.

    Every product ``p * d`` in these ops is NaN only where the probability ``p``
    is 0 and ``d`` is infinite (``0 * inf``) or undefined (``-inf - -inf``);
    such an entry contributes exactly 0.
    """
    return torch.nan_to_num_(x, nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def upstream_per_row(grad_output: torch.Tensor, temperature: float) -> torch.Tensor:
    """Upstream gradient as an fp32 column ``[n, 1]``, divided by the temperature."""
    return (grad_output.reshape(-1, 1).to(torch.float32) / temperature).contiguous()


def local_targets(target: torch.Tensor, n: int, vocab_local: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps GLOBAL target ids ``[n]`` to (shard-local index, in-this-shard mask)."""
    rank, world = shard_rank_and_size(tp_group)
    flat = target.reshape(-1)
    if flat.numel() != n:
        raise ValueError(f"target has {flat.numel()} tokens but logits have {n}")
    if flat.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target must hold integer token ids, got {flat.dtype}")
    if n and bool(((flat < 0) | (flat >= vocab_local * world)).any()):
        raise ValueError(
            f"target ids must lie in [0, {vocab_local * world}) (global vocabulary); "
            f"got min {int(flat.min())}, max {int(flat.max())}"
        )
    local = flat.long() - rank * vocab_local
    in_shard = (local >= 0) & (local < vocab_local)
    return torch.where(in_shard, local, torch.zeros_like(local)), in_shard


def row_max(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row max of ``chunk / temperature`` in fp32 ``[c]`` (exact in any dtype)."""
    return chunk.amax(dim=-1).to(torch.float32).div_(temperature)


def scaled_minus(chunk: torch.Tensor, temperature: float, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = chunk / temperature - shift[:, None]`` in fp32, reading ``chunk`` once when T == 1.

    ``chunk`` is widened to fp32 before the division: ``torch.div(bf16, T, out=fp32)``
    divides in bf16 and only then widens, which put log-probs 0.05 nats off at T = 0.7.
    """
    if temperature == 1.0:
        return torch.sub(chunk, shift[:, None], out=out)
    return out.copy_(chunk).div_(temperature).sub_(shift[:, None])


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(logits: torch.Tensor, backend: str | None) -> bool:
    """Whether an op with a Triton path runs it for ``logits``.

    Args:
        logits: The student logits.
        backend: ``"auto"`` (Triton for CUDA tensors when triton is installed,
            else PyTorch), ``"torch"`` or ``"triton"`` (forced; CPU tensors then
            need ``TRITON_INTERPRET=1``). None reads ``$MEGATRON_SDPG_VOCAB_BACKEND``,
            default ``"auto"``.
    """
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        where = "backend" if backend is not None else f"${BACKEND_ENV}"
        raise ValueError(f"{where} must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was asked for but triton is not installed (pip install triton)")
        return True
    return logits.is_cuda and triton_available()
