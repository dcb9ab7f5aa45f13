"""Weight updates of the CPU server's model: from an HF directory, named tensors, or a broadcast.

Every update is validated in full (names known, shapes equal) before any
parameter is written, so a rejected update leaves the model as it was.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_sdpg.weights.process_group import destroy_weight_update_group, init_weight_update_group, torch_dtype


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded with an index).

    Raises:
        FileNotFoundError: No ``*.safetensors`` file in ``path``.
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
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(os.path.join(path, name)))
    return out


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
        seen: set[str] = set()
        for name, t in pairs:
            if name not in self.params:
                raise ValueError(f"weight {name!r} is not a parameter of the served model")
            if name in seen:
                raise ValueError(f"weight {name!r} given twice")
            seen.add(name)
            want = tuple(self.params[name].shape)
            if tuple(t.shape) != want:
                raise ValueError(f"weight {name!r} has shape {tuple(t.shape)}, the model has {want}")
        if require_all:
            missing = sorted(set(self.params) - seen - self.optional)
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]!r}")
        nbytes = 0
        for name, t in pairs:
            p = self.params[name]
            p.data.copy_(t.to(p.dtype))
            nbytes += t.numel() * t.element_size()
        return nbytes

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
