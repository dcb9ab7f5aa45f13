"""Lets megatron-core run on CPU with gloo when CUDA is absent; does nothing on GPU.

megatron-core 0.16 hard-codes CUDA in many places: ``torch.cuda.current_device()``
and literal ``device="cuda"`` in factory calls (rotary embeddings, the global
memory buffer, DDP grad buffers, pipeline p2p buffers, optimizer utilities),
``.cuda()`` moves, ``param.type() == 'torch.cuda.FloatTensor'`` checks in the
optimizers and grad clipping, and ``torch.cuda`` streams, events, nvtx and
synchronisation. This module redirects all of them to the CPU:

* a process-wide :class:`torch.overrides.TorchFunctionMode` that rewrites CUDA
  devices (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``, a bare ordinal)
  to ``"cpu"`` in factory calls and ``.to()``, turns ``.cuda()`` into a no-op,
  drops ``pin_memory``, and reports CPU tensor types under their CUDA names so
  megatron's dtype dispatch (``'torch.cuda.FloatTensor'``) takes the right branch;
* ``torch.cuda`` functions that megatron calls unguarded (``current_device``,
  ``synchronize``, ``Stream``, ``Event``, ``nvtx``, memory statistics) replaced
  by CPU equivalents;
* megatron's model-parallel RNG tracker pointed at the CPU generator. On a CPU
  build ``torch.cuda.manual_seed`` is queued lazily and silently never runs, so
  without this every tensor-parallel rank would draw the same "model-parallel"
  random numbers. After :func:`enable`, TP ranks get different model-parallel
  streams and DP ranks identical ones, as on GPU.

:func:`enable` is called once per process by :func:`megatron_sdpg.platform.setup`
and is a no-op when ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare ordinal means a CUDA device in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU in every torch call of this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoOpEvent:
    """Stands in for ``torch.cuda.Event`` on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_NOOP_STREAM = _NoOpStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda device=None: _NOOP_STREAM
    cuda.default_stream = lambda device=None: _NOOP_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.nvtx.range_push = lambda msg: 0
    cuda.nvtx.range_pop = lambda: 0
    cuda.nvtx.range = lambda msg, *a, **k: contextlib.nullcontext()
    # The "CUDA" generator is the CPU generator on a CPU machine.
    # (torch.manual_seed itself calls cuda.manual_seed_all: keep that one a no-op.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


class _SameGeneratorFilter(logging.Filter):
    """Drops megatron's warning that the CPU RNG moved inside a "GPU" RNG fork.

    On CPU the model-parallel RNG fork *is* the CPU generator, so the warning
    would fire on every forked region and says nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng() -> None:
    try:
        from megatron.core.tensor_parallel import random as mp_random
    except ImportError:
        return
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mp_random.__name__).addFilter(_SameGeneratorFilter())


def enable() -> bool:
    """Turns the redirect on for this process when CUDA is absent.

    Idempotent and thread-safe. Must run before megatron-core builds models or
    process-group state.

    Returns:
        True when the redirect is active (no CUDA), False on a CUDA machine.
    """
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ENABLED:
            return True
        _patch_torch_cuda()
        _patch_megatron_rng()
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
        _ENABLED = True
    return True


def is_enabled() -> bool:
    """True when :func:`enable` has switched the redirect on in this process."""
    return _ENABLED
