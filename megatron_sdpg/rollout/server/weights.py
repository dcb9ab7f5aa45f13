"""Weight updates of the CPU server's model: from an HF directory, named tensors, or a broadcast.

Every update is validated in full (names known, shapes equal) before any
parameter is written, so a rejected update leaves the model as it was.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_sdpg.weights.tensor_codec import parse_safetensors_header
from megatron_sdpg.weights.process_group import destroy_weight_update_group, init_weight_update_group, torch_dtype


def safetensors_files(path: str) -> list[str]:
    """The ``*.safetensors`` files of an HF checkpoint directory (single file or sharded with an index).

    Raises:
        FileNotFoundError: ``path`` is not a directory or has no ``*.safetensors`` file.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model_path: {path} is not a directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"model_path: no .safetensors files in {path}")
    return [os.path.join(path, name) for name in files]


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
        self._groups: dict[str, dist.ProcessGroup] = {}

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, torch.Tensor]], require_all: bool) -> int:
        """Copies tensors into the parameters of the same names.

        Args:
            named: ``(hf_name, tensor)`` pairs (any float dtype; cast to the parameter's).
            require_all: Every parameter must be given (a full checkpoint).

        Returns:
            Number of bytes written.

        Raises:
            ValueError: Unknown name, shape mismatch, duplicate, or (``require_all``) a missing name.
        """
        pairs = list(named)
        self._check([(name, t.shape) for name, t in pairs], require_all)
        nbytes = 0
        for name, t in pairs:
            p = self.params[name]
            p.data.copy_(t.to(p.dtype))
            nbytes += t.numel() * t.element_size()
        return nbytes

    @torch.no_grad()
    def load_dir(self, path: str) -> int:
        """Loads a full HF safetensors checkpoint, reading the files straight into the parameters.

        All headers are read and checked first (nothing is written on a bad checkpoint);
        then each tensor is read with one ``readinto`` into its parameter's memory when
        dtypes match (else read and cast), so the bytes are copied once, not three times
        as with ``load_file`` + ``copy_``.

        Returns:
            Number of bytes read.

        Raises:
            FileNotFoundError: No checkpoint at ``path``.
            ValueError: A bad file, unknown name, shape mismatch, duplicate or missing weight.
        """
        plan = []
        for file in safetensors_files(path):
            with open(file, "rb") as f:
                entries, base = parse_safetensors_header(f.read(8), f.read, os.fstat(f.fileno()).st_size, file)
            plan.extend((file, base, e) for e in entries)
        self._check([(e[0], e[2]) for _, _, e in plan], require_all=True)
        nbytes = 0
        for file, group in itertools.groupby(plan, key=lambda x: x[0]):
            with open(file, "rb", buffering=0) as f:
                for _, base, (name, dtype, shape, start, end) in group:
                    p = self.params[name].data
                    if dtype == p.dtype and p.is_contiguous():
                        dst = p
                    else:
                        dst = torch.empty(shape, dtype=dtype)
                    f.seek(base + start)
                    view = memoryview(dst.reshape(-1).view(torch.uint8).numpy()) if end > start else memoryview(b"")
                    got = 0
                    while got < end - start:  # readinto may return short counts
                        n = f.readinto(view[got:])
                        if not n:
                            raise ValueError(f"{file}: truncated while reading {name!r}")
                        got += n
                    if dst is not p:
                        p.copy_(dst.to(p.dtype))
                    nbytes += end - start
        return nbytes

    def _check(self, names_shapes: list[tuple[str, torch.Size | list[int]]], require_all: bool) -> None:
        """Names known, no duplicates, shapes equal, and (``require_all``) none missing."""
        seen: set[str] = set()
        for name, shape in names_shapes:
            if name not in self.params:
                raise ValueError(f"weight {name!r} is not a parameter of the served model")
            if name in seen:
                raise ValueError(f"weight {name!r} given twice")
            seen.add(name)
            want = tuple(self.params[name].shape)
            if tuple(shape) != want:
                raise ValueError(f"weight {name!r} has shape {tuple(shape)}, the model has {want}")
        if require_all:
            missing = sorted(set(self.params) - seen - self.optional)
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]!r}")

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str) -> None:
        """Joins the trainer's weight-update group as rank ``rank_offset`` (this server has no TP)."""
        if backend != "gloo":
            raise ValueError(f"backend: the CPU server joins gloo groups only, got {backend!r}")
        if group_name in self._groups:
            raise ValueError(f"group_name: {group_name!r} already initialised")
        self._groups[group_name] = init_weight_update_group(
            master_address, master_port, rank_offset, world_size, group_name, backend
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
