"""Weight updates of the CPU server's model: from an HF directory, named tensors, a
streamed safetensors body, or a broadcast.

Every update is validated in full (names known, shapes equal, a floating dtype
for a floating parameter, every value finite) before any parameter is written,
so a rejected update leaves the model as it was. A streamed body
(``StreamedLoad``) is validated from its header before its data arrives and is
written as it arrives; if the connection then breaks mid-body (or its data holds
NaN/inf), the parameters it touched are marked dirty: ``not_ready()`` then says
so, the server answers 503 to ``/generate`` and ``/health``, and the weight
version does not change, until an update that writes those parameters in full
succeeds.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from megatron_sdpg.rollout.fingerprint import safetensors_files  # noqa: F401 - re-exported
from megatron_sdpg.formats.safetensors_format import byte_view, parse_safetensors_header
from megatron_sdpg.rollout.process_group import destroy_weight_update_group, init_weight_update_group, torch_dtype


class ModelWeights:
    """In-place writer of a model's parameters by HF name.

    Args:
        model: The served ``transformers`` model.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = dict(model.state_dict(keep_vars=True))
        tied = getattr(model.config, "tie_word_embeddings", False)
        # With tied embeddings a checkpoint may omit lm_head.weight (it aliases the embedding).
        self.optional = {"lm_head.weight"} if tied else set()
        self.dirty: set[str] = set()  # parameters a broken update left partly written
        self._groups: dict[str, dist.ProcessGroup] = {}

    def not_ready(self) -> str | None:
        """Why the weights must not be served now, or ``None``."""
        if not self.dirty:
            return None
        return (f"{len(self.dirty)} weights (e.g. {min(self.dirty)!r}) were left partly written by a weight "
                "update that did not complete; waiting for an update that writes them in full")

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, torch.Tensor]], require_all: bool) -> int:
        """Copies tensors into the parameters of the same names.

        Args:
            named: ``(hf_name, tensor)`` pairs (any float dtype; cast to the parameter's).
            require_all: Every parameter must be given (a full checkpoint).

        Returns:
            Number of bytes written.

        Raises:
            ValueError: Unknown name, shape or dtype mismatch, duplicate, a non-finite value,
                or (``require_all``) a missing name.
        """
        pairs = list(named)
        self._check([(name, t.dtype, t.shape) for name, t in pairs], require_all)
        for name, t in pairs:
            _require_finite(name, t)
        nbytes = 0
        for name, t in pairs:
            p = self.params[name]
            p.data.copy_(t.to(p.dtype))
            nbytes += t.numel() * t.element_size()
        self.dirty.difference_update(name for name, _ in pairs)
        return nbytes

    @torch.no_grad()
    def load_dir(self, path: str) -> int:
        """Loads a full HF safetensors checkpoint, reading the files straight into the parameters.

        All headers are read and checked first, then every tensor is read once to
        check its values are finite (nothing is written on a bad checkpoint);
        then each tensor is read with one ``readinto`` into its parameter's memory when
        dtypes match (else read and cast), so the bytes are copied once, not three times
        as with ``load_file`` + ``copy_``.

        Returns:
            Number of bytes read.

        Raises:
            FileNotFoundError: No checkpoint at ``path``.
            ValueError: A bad file, unknown name, shape or dtype mismatch, duplicate or missing
                weight, or a non-finite value.
        """
        plan = []
        for file in safetensors_files(path):
            with open(file, "rb") as f:
                entries, base = parse_safetensors_header(f.read(8), f.read, os.fstat(f.fileno()).st_size, file)
            plan.extend((file, base, e) for e in entries)
        self._check([(e[0], e[1], e[2]) for _, _, e in plan], require_all=True)
        for file, group in itertools.groupby(plan, key=lambda x: x[0]):  # pass 1: values finite
            with open(file, "rb", buffering=0) as f:
                for _, base, (name, dtype, shape, start, end) in group:
                    _require_finite(name, _read_into(f, base, start, end, torch.empty(shape, dtype=dtype), file, name))
        nbytes = 0
        for file, group in itertools.groupby(plan, key=lambda x: x[0]):  # pass 2: into the parameters
            with open(file, "rb", buffering=0) as f:
                for _, base, (name, dtype, shape, start, end) in group:
                    p = self.params[name].data
                    if dtype == p.dtype and p.is_contiguous():
                        dst = p
                    else:
                        dst = torch.empty(shape, dtype=dtype)
                    self.dirty.add(name)
                    _read_into(f, base, start, end, dst, file, name)
                    if dst is not p:
                        p.copy_(dst.to(p.dtype))
                    self.dirty.discard(name)
                    nbytes += end - start
        return nbytes

    def streamed_load(self, entries: list[tuple[str, torch.dtype, list[int], int, int]], data_start: int,
                      total_len: int) -> "StreamedLoad":
        """Plans writing a safetensors body's data straight into the parameters (see ``StreamedLoad``).

        Raises:
            ValueError: Unknown name, shape mismatch, duplicate, or overlapping tensors.
        """
        self._check([(name, dtype, shape) for name, dtype, shape, _, _ in entries], require_all=False)
        return StreamedLoad(self.params, entries, data_start, total_len, self.dirty)

    def _check(self, entries: list[tuple[str, torch.dtype, torch.Size | list[int]]], require_all: bool) -> None:
        """Names known, no duplicates, shapes equal, floating dtypes for floating parameters,
        and (``require_all``) none missing."""
        seen: set[str] = set()
        for name, dtype, shape in entries:
            if name not in self.params:
                raise ValueError(f"weight {name!r} is not a parameter of the served model")
            if name in seen:
                raise ValueError(f"weight {name!r} given twice")
            seen.add(name)
            want = tuple(self.params[name].shape)
            if tuple(shape) != want:
                raise ValueError(f"weight {name!r} has shape {tuple(shape)}, the model has {want}")
            if self.params[name].dtype.is_floating_point and not dtype.is_floating_point:
                raise ValueError(f"weight {name!r} has dtype {dtype}, the model's parameter is "
                                 f"{self.params[name].dtype} (a non-float tensor would truncate it)")
        if require_all:
            missing = sorted(set(self.params) - seen - self.optional)
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]!r}")

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
                   backend: str, timeout_s: float = 300.0) -> None:
        """Joins the trainer's weight-update group as rank ``rank_offset`` (this server has no TP).

        Blocks until the rendezvous meets or ``timeout_s`` passes; needs no model access,
        so the server runs it off the model worker.
        """
        if backend != "gloo":
            raise ValueError(f"backend: the CPU server joins gloo groups only, got {backend!r}")
        if group_name in self._groups:
            raise ValueError(f"group_name: {group_name!r} already initialised")
        self._groups[group_name] = init_weight_update_group(
            master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s
        )

    def destroy_group(self, group_name: str) -> None:
        if group_name not in self._groups:
            raise ValueError(f"group_name: {group_name!r} does not exist")
        destroy_weight_update_group(self._groups.pop(group_name))

    def receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str) -> int:
        """Receives one bucket broadcast from rank 0, tensor by tensor in order, and loads it.

        Shapes are checked against the model before the broadcast starts; a bad
        bucket is still received in full (so the trainer does not hang) and then rejected.
        """
        if group_name not in self._groups:
            raise ValueError(f"group_name: {group_name!r} not initialised; call /init_weights_update_group first")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError("names, dtypes and shapes must have the same length")
        pg = self._groups[group_name]
        torch_dtypes = [torch_dtype(d) for d in dtypes]  # all checked before the first broadcast
        received = []
        for name, dtype, shape in zip(names, torch_dtypes, shapes):
            t = torch.empty(shape, dtype=dtype)
            dist.broadcast(t, src=0, group=pg)
            received.append((name, t))
        return self.load(received, require_all=False)


def _require_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"weight {name!r} holds NaN or inf values")


def _read_into(f, base: int, start: int, end: int, dst: torch.Tensor, file: str, name: str) -> torch.Tensor:
    """Reads bytes ``[base + start, base + end)`` of ``f`` into ``dst``'s memory; returns ``dst``."""
    f.seek(base + start)
    view = byte_view(dst) if end > start else memoryview(b"")
    got = 0
    while got < end - start:  # readinto may return short counts
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{file}: truncated while reading {name!r}")
        got += n
    return dst


class StreamedLoad:
    """Writes the data section of a safetensors body into the parameters as it arrives.

    Bytes of a tensor whose dtype equals its parameter's go straight into the
    parameter's memory; other tensors are collected in a buffer of their own dtype
    and cast into the parameter by ``finish``. Runs on the model worker (nothing
    else touches the parameters meanwhile). The tensors are in ``dirty`` from the
    first byte written until ``finish`` has checked them complete and finite.

    Args:
        params: The model's parameters by HF name.
        entries: Checked header entries ``(name, dtype, shape, start, end)``.
        data_start: Offset of the data section in the body.
        total_len: Length of the whole body.
        dirty: The weights' set of partly written parameter names (shared, updated here;
            default: a set of its own).

    Raises:
        ValueError: Two tensors overlap in the data section.
    """

    def __init__(self, params: dict[str, torch.Tensor], entries, data_start: int, total_len: int,
                 dirty: set[str] | None = None):
        self.total_len = total_len
        self.dirty = set() if dirty is None else dirty
        self.names = [e[0] for e in entries]
        self.written: list[tuple[str, torch.Tensor]] = []
        self.pos = data_start
        self.nbytes = 0
        self.casts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.targets: list[tuple[int, int, np.ndarray]] = []  # absolute [start, end) and where its bytes go
        end_prev, prev = data_start, None
        for name, dtype, shape, start, end in sorted(entries, key=lambda e: e[3]):
            if data_start + start < end_prev:
                raise ValueError(f"tensors {prev!r} and {name!r} overlap in the data section")
            end_prev, prev = data_start + end, name
            if end == start:
                continue
            p = params[name].data
            dst = p if dtype == p.dtype and p.is_contiguous() else torch.empty(shape, dtype=dtype)
            if dst is not p:
                self.casts.append((p, dst))
            self.written.append((name, dst))
            self.targets.append((data_start + start, data_start + end, dst.reshape(-1).view(torch.uint8).numpy()))
            self.nbytes += end - start
        self._next = 0  # first target not yet complete

    @torch.no_grad()
    def feed(self, chunk: bytes | memoryview) -> None:
        """The next bytes of the body (after the header), in order."""
        src = np.frombuffer(chunk, dtype=np.uint8)  # numpy copies release the GIL: receiving goes on meanwhile
        self.dirty.update(self.names)
        lo, hi = self.pos, self.pos + len(src)
        if hi > self.total_len:
            raise ValueError(f"body: more than the {self.total_len} bytes announced")
        while self._next < len(self.targets):
            start, end, dst = self.targets[self._next]
            if start >= hi:
                break
            a, b = max(start, lo), min(end, hi)
            if a < b:
                dst[a - start : b - start] = src[a - lo : b - lo]
            if end > hi:
                break
            self._next += 1
        self.pos = hi

    @torch.no_grad()
    def finish(self) -> int:
        """Checks the body was complete and casts the tensors that needed it; returns bytes loaded."""
        if self.pos != self.total_len:
            raise ValueError(f"body: ended after {self.pos} of {self.total_len} bytes; the bucket is partly written")
        for name, t in self.written:
            _require_finite(name, t)  # raised: the bucket stays dirty until a complete update
        for p, src in self.casts:
            p.copy_(src.to(p.dtype))
        self.dirty.difference_update(self.names)
        return self.nbytes
