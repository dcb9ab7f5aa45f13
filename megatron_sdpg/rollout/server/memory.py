"""``/release_memory_occupation`` and ``/resume_memory_occupation`` on the CPU server.

SGLang (started with ``--enable-memory-saver``) frees its weights, KV cache and CUDA
graphs on release, so that a colocated trainer can use the GPU memory, and maps
fresh memory on resume; without ``--enable-weights-cpu-backup`` the weights' old
contents are gone, so a weight update must follow the resume. This module does the
same to the CPU model: release swaps every parameter's data for an empty tensor
(and asks glibc to hand the freed pages back to the OS, so the process's resident
memory falls); resume gives each parameter fresh zero-filled memory of its shape,
for the next weight update to overwrite. There is no persistent KV cache here (each batch owns
its cache), so the ``kv_cache`` and ``cuda_graph`` tags have nothing to free and
are only recorded. While the weights are released, generation and weight updates
are refused with a 400 naming the cause.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
from typing import Sequence

import torch

TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's GPU_MEMORY_TYPE_* (sglang/srt/constants.py)


def resident_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from ``/proc/<pid>/statm`` (0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> None:
    """Returns free heap pages to the OS (glibc); a no-op elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor ``[*shape]`` in an anonymous memory map of its own, its pages resident.

    Freeing it unmaps the pages at once. From malloc they could stay with the process (measured:
    14 of 21.5 MB still resident after a release's ``malloc_trim``, then reused by the next resume);
    likely, though not measured itself: after the first release frees malloc's mapped chunks, glibc
    raises its mmap threshold, the next weights come from a thread's arena, and ``malloc_trim`` does
    not shrink such an arena's top chunk.
    """
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, numel * dtype.itemsize)  # the tensor keeps it alive; freed -> unmapped
    out = torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)
    out.zero_()  # touch every page now, as SGLang's resume maps the memory now
    return out


class MemoryOccupation:
    """Frees and restores the memory of a model's parameters.

    Args:
        model: The served model; its parameters keep their identity (``.data`` is swapped),
            so code holding the ``Parameter`` objects sees the new memory.
    """

    def __init__(self, model: torch.nn.Module):
        unique: dict[int, torch.nn.Parameter] = {}
        for p in model.parameters():  # tied weights are one Parameter
            unique.setdefault(id(p), p)
        self._params = [(p, tuple(p.shape), p.dtype) for p in unique.values()]
        self.released: set[str] = set()

    @staticmethod
    def tags_of(tags: Sequence[str] | None) -> set[str]:
        """SGLang's ``tags`` field: ``None`` means all of them.

        Raises:
            ValueError: An unknown tag.
        """
        if tags is None:
            return set(TAGS)
        if not isinstance(tags, list) or any(t not in TAGS for t in tags):
            raise ValueError(f"tags: must be a list of {list(TAGS)} or null, got {tags!r}")
        return set(tags)

    @property
    def weights_released(self) -> bool:
        return "weights" in self.released

    @torch.no_grad()
    def release(self, tags: set[str]) -> int:
        """Frees what ``tags`` name; returns the bytes of parameter memory freed."""
        freed = 0
        if "weights" in tags and not self.weights_released:
            for p, _, dtype in self._params:
                freed += p.numel() * p.element_size()
                p.data = torch.empty(0, dtype=dtype)
            _malloc_trim()
        self.released |= tags
        return freed

    @torch.no_grad()
    def resume(self, tags: set[str]) -> int:
        """Restores what ``tags`` name (weights zero-filled: a weight update must follow);
        returns the bytes of parameter memory allocated."""
        allocated = 0
        if "weights" in tags and self.weights_released:
            for p, shape, dtype in self._params:
                p.data = _mapped_zeros(shape, dtype)
                allocated += p.numel() * p.element_size()
        self.released -= tags
        return allocated
